"""The training application behind ``pddm-ext train`` / ``pddm-ext compare``: the CLI (``cli``),
the training loop (``train``) with its configuration and checks (``config``), what it prints and writes
(``report``), its hold-out split (``holdout``) and DDP (``ddp``), its losses and optimiser (``losses``),
checkpoints and seeding (``checkpoint``), the loss comparison (``compare``), datasets (``datasets``,
with ``glyphs`` and ``folder_images``), models (``models``, the networks defined here in ``backbones``)
and retrieval evaluation (``evaluate``).

Needs the ``train`` extra: from a checkout, ``pip install '.[train]'`` (with torch
already installed).
"""

import importlib

# The modules the train extra provides (import name -> distribution), checked before any work.
TRAIN_EXTRA = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
               "pytorch_metric_learning": "pytorch-metric-learning"}


def extra_hint(extra="train"):
    """The install command for an extra, as it works from a checkout (the package is on no index yet)."""
    return f"from a checkout: pip install '.[{extra}]'"


def missing_train_extra():
    """Distribution names of the train extra whose modules cannot be imported (empty when complete)."""
    missing = []
    for module, dist in TRAIN_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing
