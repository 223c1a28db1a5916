"""pddm_ext: fused PDDM scoring and hard-quadruplet mining for PyTorch.

The contract is SPEC.md: ``PDDM``, ``pddm_scores``, ``mine_hard``, ``batch_hard``, ``PDDMLoss``;
``pddm_ext.reference`` is the plain PyTorch oracle of every op.
"""

from . import ops  # noqa: F401  (registers the ops, their fake kernels and autograd)
from . import data, reference
from .functional import Quadruplets, batch_hard, mine_hard, pair_scores, pddm_scores
from .modules import PDDM, PDDMLoss

__version__ = "0.1.0"

__all__ = [
    "PDDM",
    "PDDMLoss",
    "Quadruplets",
    "batch_hard",
    "data",
    "mine_hard",
    "pair_scores",
    "pddm_scores",
    "reference",
]
