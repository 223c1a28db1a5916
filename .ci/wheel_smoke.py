"""Run by `make pip-check` inside the fresh venv the package was installed into (cwd: that venv, so
the checkout is not importable): the installed package imports, its op matches the reference, opcheck
passes, and the build record next to the extension names this torch."""

import json
import pathlib

import torch

import pddm_ext
from pddm_ext import reference

assert "site-packages" in pathlib.Path(pddm_ext.__file__).parts, f"imported from the checkout: {pddm_ext.__file__}"
extension = pathlib.Path(pddm_ext._C.__file__)
record = json.loads((extension.parent / "_build_info.json").read_text())
assert record["torch"] == torch.__version__ and record["extension"] == extension.name, record
assert record["kernels"] == "cpu" and not pddm_ext._C.with_cuda, record
torch.manual_seed(0)
unit = pddm_ext.PDDM(5, 7, 3).double()
x = torch.randn(9, 5, dtype=torch.float64)
params = [p.detach() for p in unit.params()]
torch.testing.assert_close(pddm_ext.pddm_scores(x, None, *params), reference.pddm_scores(x, None, params))
torch.library.opcheck(torch.ops.pddm_ext.scores.default, (x, None, *params))
print(f"pip-check: pddm_ext {pddm_ext.__version__} from {pddm_ext.__file__} with torch {torch.__version__}: OK")
