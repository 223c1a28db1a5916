"""Run by `make wheel-check` inside the fresh venv the wheel was installed into (cwd: that venv, so
the checkout is not importable): the installed package imports, its op matches the reference, and
opcheck passes."""

import pathlib

import torch

import pddm_ext
from pddm_ext import reference

assert "site-packages" in pathlib.Path(pddm_ext.__file__).parts, f"imported from the checkout: {pddm_ext.__file__}"
torch.manual_seed(0)
unit = pddm_ext.PDDM(5, 7, 3).double()
x = torch.randn(9, 5, dtype=torch.float64)
params = [p.detach() for p in unit.params()]
torch.testing.assert_close(pddm_ext.pddm_scores(x, None, *params), reference.pddm_scores(x, None, params))
torch.library.opcheck(torch.ops.pddm_ext.scores.default, (x, None, *params))
print(f"wheel-check: pddm_ext {pddm_ext.__version__} from {pddm_ext.__file__} with torch {torch.__version__}: OK")
