"""pddm_ext: fused PDDM scoring and hard-quadruplet mining for PyTorch.

The contract is SPEC.md: ``PDDM``, ``pddm_scores``, ``mine_hard``, ``batch_hard``, ``PDDMLoss``;
``pddm_ext.reference`` is the plain PyTorch oracle of every op. For existing trainers:
``PDDMMiner`` (a pytorch-metric-learning miner), ``MemoryBank`` (mining against past batches) and
``pddm_ext.distributed`` (mining over the global batch under torch.distributed).
"""

from . import ops  # noqa: F401  (registers the ops, their fake kernels and autograd)
from . import data, distributed, reference
from .functional import Quadruplets, batch_hard, mine_hard, pair_scores, pddm_scores
from .memory import MemoryBank
from .modules import PDDM, PDDMLoss

__version__ = "0.1.0"

__all__ = [
    "MemoryBank",
    "PDDM",
    "PDDMLoss",
    "PDDMMiner",
    "Quadruplets",
    "batch_hard",
    "data",
    "distributed",
    "mine_hard",
    "pair_scores",
    "pddm_scores",
    "reference",
]


def __getattr__(name):
    # PDDMMiner subclasses pytorch-metric-learning's BaseMiner when PML is installed: importing PML
    # costs about half a second, so it happens on first use, not on `import pddm_ext`.
    if name == "PDDMMiner":
        from .miners import PDDMMiner

        return PDDMMiner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
