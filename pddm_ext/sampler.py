"""The P x K batch sampler of SPEC §4: P classes, K samples of each per batch."""

from __future__ import annotations

import torch


class PKSampler(torch.utils.data.Sampler):
    """Yields batches of P classes x K samples each (a ``batch_sampler`` for ``DataLoader``).

    ``labels``: one integer label per dataset item. Each batch draws P distinct classes (without
    replacement) and K items of each; a class with fewer than K items is sampled with replacement.
    ``num_batches`` defaults to one epoch's worth, len(labels) // (P K). ``seed`` makes the
    sequence reproducible; iterating again continues the random stream.
    """

    def __init__(self, labels, p, k, *, num_batches=None, seed=None):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if labels.dtype == torch.bool or labels.is_floating_point():
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        classes, inverse = torch.unique(labels, return_inverse=True)
        for name, value in (("p", p), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if k < 2:
            raise ValueError(f"k must be >= 2 (every class needs a positive pair), got {k}")
        if not 1 <= p <= len(classes):
            raise ValueError(f"p must be between 1 and the number of classes ({len(classes)}), got {p}")
        self.p, self.k = p, k
        self.by_class = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
        self.num_batches = num_batches if num_batches is not None else max(1, labels.numel() // (p * k))
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        g = self.generator
        for _ in range(self.num_batches):
            batch = []
            for c in torch.randperm(len(self.by_class), generator=g)[: self.p].tolist():
                items = self.by_class[c]
                if len(items) >= self.k:
                    pick = items[torch.randperm(len(items), generator=g)[: self.k]]
                else:
                    pick = items[torch.randint(len(items), (self.k,), generator=g)]
                batch.extend(pick.tolist())
            yield batch
