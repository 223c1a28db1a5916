"""The hold-out split: a seeded share of the training classes' images kept out of training, so that the
PDDM unit's diagnostics (``pddm_ext.app.diagnostics``) can be measured on pairs of classes the network
trains on but images it never saw (``TrainConfig.holdout``; ``train.Run`` makes the split at setup)."""

from __future__ import annotations

import dataclasses

import torch

from .datasets import TensorImages


def holdout_split(split, fraction, seed):
    """``split`` with ``fraction`` of each training class's images moved to ``split.heldout`` (a
    seeded choice, at least 2 per class when a class has >= 4 images, so held-out positive pairs
    exist, and at most all but 2, so the class keeps a training pair; none when fraction is 0).
    Returns (split, heldout dataset or None: None also when no class has 4 images)."""
    if fraction == 0:
        return split, None
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(split.train_labels):
        items = torch.nonzero(split.train_labels == c).flatten()
        # at least 2 (a held-out positive pair), at most all but 2 (the class keeps a training pair)
        n = min(max(2, round(fraction * len(items))), len(items) - 2) if len(items) >= 4 else 0
        held.append(items[torch.randperm(len(items), generator=g)[:n]])
    held = torch.cat(held).sort().values
    if len(held) == 0:  # every training class has fewer than 4 images: nothing to hold out
        return split, None
    keep = torch.ones(len(split.train_labels), dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().flatten()

    def subset(ds, idx):
        if isinstance(ds, TensorImages):
            return TensorImages(ds.images[idx], ds.labels[idx])
        return torch.utils.data.Subset(ds, idx.tolist())

    new = dataclasses.replace(split, train=subset(split.train, kept), train_labels=split.train_labels[kept])
    return new, subset(split.train, held)
