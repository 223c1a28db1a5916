"""pddm_ext: fused PDDM scoring and hard-quadruplet mining for PyTorch.

Three layers, each depending only on the ones before it:

* the core library (this package's top level): the ops (``ops``), ``PDDM``, ``pddm_scores``,
  ``mine_hard``, ``batch_hard``, ``PDDMLoss``, the ``PKSampler`` (``pddm_ext.sampler``),
  ``pddm_ext.collectives`` (the torch.distributed primitives ``PDDMLoss(distributed=True)`` uses) and
  ``pddm_ext.reference``, the plain PyTorch oracle of every op and the one home of its formulas;
* trainer integrations (``pddm_ext.integrations``): ``PDDMMiner`` (a pytorch-metric-learning miner),
  ``MemoryBank`` (mining against past batches) and ``distributed`` (mining over the global batch
  under torch.distributed);
* the training application (``pddm_ext.app``): ``pddm-ext train`` / ``compare``, its datasets,
  models and retrieval evaluation.

``import pddm_ext`` loads the core only; the other layers' public names (``pddm_ext.PDDMMiner``,
``pddm_ext.MemoryBank``, ``pddm_ext.distributed``) are attributes imported on first use:
``pddm_ext.distributed`` is the module ``pddm_ext.integrations.distributed`` (an attribute, not an
importable ``pddm_ext.distributed`` module).
The design, contracts and errors: docs/design.md.
"""

import importlib

from . import ops  # noqa: F401  (registers the ops, their fake kernels and autograd)
from . import collectives, reference
from .functional import Quadruplets, batch_hard, mine_hard, pair_scores, pddm_scores
from .modules import PDDM, PDDMLoss
from .sampler import PKSampler

__version__ = "0.1.0"

__all__ = [
    "MemoryBank",
    "PDDM",
    "PDDMLoss",
    "PDDMMiner",
    "PKSampler",
    "Quadruplets",
    "batch_hard",
    "distributed",
    "mine_hard",
    "pair_scores",
    "pddm_scores",
    "reference",
]

# name -> (module, attribute or None for the module itself), imported on first use: PDDMMiner
# subclasses pytorch-metric-learning's BaseMiner (importing PML costs about half a second), and the
# other layers must not load with the core.
_LAZY = {
    "PDDMMiner": ("pddm_ext.integrations.miners", "PDDMMiner"),
    "MemoryBank": ("pddm_ext.integrations.memory", "MemoryBank"),
    "distributed": ("pddm_ext.integrations.distributed", None),
    "integrations": ("pddm_ext.integrations", None),
    "app": ("pddm_ext.app", None),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
