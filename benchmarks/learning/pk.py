"""The P x K batches of the learning scripts (main_job.py, plain_loop.py): one generator, so that both
draw the same way (their committed figures depend on these draws)."""

from __future__ import annotations

import torch


def pk_batches(labels, p, k, generator):
    """Endless P x K index batches: P classes drawn without replacement, K items of each, without
    replacement within a class that has at least K items (else with replacement). ``labels`` is a 1-D
    tensor of class labels; the batches are 1-D int64 tensors of P K indices into it."""
    classes = labels.unique()
    by_class = [torch.nonzero(labels == c).flatten() for c in classes]
    while True:
        batch = []
        for c in torch.randperm(len(classes), generator=generator)[:p].tolist():
            items = by_class[c]
            if len(items) >= k:
                batch.append(items[torch.randperm(len(items), generator=generator)[:k]])
            else:
                batch.append(items[torch.randint(len(items), (k,), generator=generator)])
        yield torch.cat(batch)
