"""``MemoryBank``: an XBM-style ring buffer of past embeddings to mine against (docs/design.md#mining reference mode).

Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): embeddings
drift slowly once training settles, so the last few thousand batches' embeddings, detached, are good
enough references to mine hard pairs among far more candidates than one batch holds. Mining a batch
of m queries against an n-row bank is what the fused kernels are for: no (m, n) matrix is built.

    bank = pddm_ext.MemoryBank(65536, dim)
    loss_fn = pddm_ext.PDDMLoss(dim, memory=bank)   # mines each batch against the bank, then enqueues it
"""

from __future__ import annotations

import torch

from .. import _validate as V


class MemoryBank:
    """A ring buffer of ``size`` detached embeddings (``dim`` features) and their labels.

    ``enqueue(embeddings, labels)`` writes rows at the write pointer, wrapping around and overwriting
    the oldest rows once full (a batch longer than ``size`` keeps its last ``size`` rows).
    ``get()`` returns ``(embeddings, labels)`` of the filled slots in slot order: while filling,
    slots ``0 .. len(bank) - 1``; once full, all ``size`` slots, so a reference index r is slot r.

    Storage is allocated on the first ``enqueue`` with that batch's device and dtype unless
    ``device`` / ``dtype`` are given; later batches are converted to it. Not an ``nn.Module``: the
    bank is training state, not a parameter, and stays out of ``state_dict`` and DDP broadcasts.
    """

    def __init__(self, size, dim, *, device=None, dtype=None):
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.size, self.dim = size, dim
        self._device, self._dtype = device, dtype
        self.embeddings = None  # (size, dim), allocated lazily
        self.labels = None  # (size,) int64
        self.ptr = 0  # next slot to write
        self.count = 0  # filled slots, <= size

    def __len__(self):
        return self.count

    @property
    def is_full(self):
        return self.count == self.size

    def reset(self):
        """Empties the bank (keeps its storage)."""
        self.ptr = self.count = 0

    def _allocate(self, like):
        device = like.device if self._device is None else torch.device(self._device)
        dtype = self._dtype or (torch.float64 if like.dtype == torch.float64 else torch.float32)
        self.embeddings = torch.zeros(self.size, self.dim, device=device, dtype=dtype)
        self.labels = torch.full((self.size,), -1, device=device, dtype=torch.int64)

    @torch.no_grad()
    def enqueue(self, embeddings, labels):
        """Writes ``embeddings`` (b, dim), detached, and ``labels`` (b,) at the write pointer."""
        V.check_embeddings("embeddings", embeddings, d=self.dim, d_from="the bank's dim")
        if self.embeddings is None:
            self._allocate(embeddings)
        labels = V.check_labels("labels", labels, embeddings.shape[0], self.embeddings.device)
        rows = embeddings.detach().to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        if rows.shape[0] > self.size:  # only the newest `size` rows survive
            self.ptr = (self.ptr + rows.shape[0] - self.size) % self.size
            rows, labels = rows[-self.size:], labels[-self.size:]
        slots = (self.ptr + torch.arange(rows.shape[0], device=rows.device)) % self.size
        self.embeddings[slots] = rows
        self.labels[slots] = labels
        self.ptr = (self.ptr + rows.shape[0]) % self.size
        self.count = min(self.size, self.count + rows.shape[0])

    def get(self):
        """``(embeddings, labels)`` of the filled slots (views, detached); ``None, None`` while empty."""
        if self.count == 0:
            return None, None
        return self.embeddings[: self.count], self.labels[: self.count]

    def to(self, device=None, dtype=None):
        """Moves (and/or casts) the storage; returns self."""
        if device is not None:
            self._device = device
        if dtype is not None:
            self._dtype = dtype
        if self.embeddings is not None:
            self.embeddings = self.embeddings.to(device=device, dtype=dtype)
            self.labels = self.labels.to(device=device)
        return self

    def __repr__(self):
        return f"MemoryBank(size={self.size}, dim={self.dim}, filled={self.count})"
