"""The P x K batch sampler: P classes per batch, K samples of each (paper Sec. 4; docs/design.md)."""

from __future__ import annotations

import numbers

import torch


class PKSampler(torch.utils.data.Sampler):
    """Yields batches of P classes x K samples each (a ``batch_sampler`` for ``DataLoader``).

    ``labels``: one integer label per dataset item (a 1-D tensor or sequence). Each batch draws
    ``classes_per_batch`` (P) distinct classes, without replacement, and ``samples_per_class`` (K >= 2)
    items of each; a class with fewer than K items is sampled with replacement. ``num_batches``
    defaults to one epoch's worth, len(labels) // (P K). ``seed`` makes the sequence reproducible;
    iterating again continues the random stream. Each batch is a list of P K item indices.

    P and K may be given by position, ``PKSampler(labels, P, K)``, or by name. Raises ``TypeError`` for a
    non-int P, K, ``num_batches`` or ``seed``, ``ValueError`` for empty / non-1-D / non-integer labels, K < 2,
    P outside [1, number of classes], ``num_batches`` < 1 or a seed outside [-2**63, 2**64 - 1].
    """

    def __init__(self, labels, classes_per_batch, samples_per_class, *, num_batches=None, seed=None):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"labels must be a 1-D sequence of integers (a tensor, array or list of ints): {e}") from None
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if labels.dtype == torch.bool or labels.is_floating_point():
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        classes, inverse = torch.unique(labels, return_inverse=True)
        for name, value in (("classes_per_batch", classes_per_batch), ("samples_per_class", samples_per_class)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if samples_per_class < 2:
            raise ValueError(
                f"samples_per_class (K) must be >= 2 (every class needs a positive pair), got {samples_per_class}"
            )
        if not 1 <= classes_per_batch <= len(classes):
            raise ValueError(
                f"classes_per_batch (P) must be between 1 and the number of classes ({len(classes)}), "
                f"got {classes_per_batch}"
            )
        self.classes_per_batch, self.samples_per_class = classes_per_batch, samples_per_class
        self.by_class = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
        batch_size = classes_per_batch * samples_per_class
        if num_batches is not None:
            if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
                raise TypeError(f"num_batches must be an int or None, got {type(num_batches).__name__}")
            if num_batches < 1:
                raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = int(num_batches) if num_batches is not None else max(1, labels.numel() // batch_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.generator = torch.Generator()
        try:
            self.generator.manual_seed(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
        except (RuntimeError, ValueError, OverflowError) as exc:  # outside torch's seed range [-2**63, 2**64)
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {seed}") from exc

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        g, K = self.generator, self.samples_per_class
        for _ in range(self.num_batches):
            batch = []
            for c in torch.randperm(len(self.by_class), generator=g)[: self.classes_per_batch].tolist():
                items = self.by_class[c]
                if len(items) >= K:
                    pick = items[torch.randperm(len(items), generator=g)[:K]]
                else:
                    pick = items[torch.randint(len(items), (K,), generator=g)]
                batch.extend(pick.tolist())
            yield batch

