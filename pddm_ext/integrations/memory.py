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


STORAGE_DTYPES = (torch.float32, torch.float64)


def _check_dtype(dtype):
    """The bank's storage dtype: None (from the first batch) or float32 / float64."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32 or torch.float64), got {type(dtype).__name__}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


class MemoryBank:
    """A ring buffer of ``size`` detached embeddings (``dim`` features) and their labels.

    ``enqueue(embeddings, labels)`` writes rows at the write pointer, wrapping around and overwriting
    the oldest rows once full (a batch longer than ``size`` keeps its last ``size`` rows).
    ``get()`` returns ``(embeddings, labels)`` of the filled slots in slot order: while filling,
    slots ``0 .. len(bank) - 1``; once full, all ``size`` slots, so a reference index r is slot r.

    ``size`` and ``dim`` are positive ints (``TypeError`` / ``ValueError`` otherwise); ``dtype`` is
    float32 or float64. ``enqueue`` validates like every entry point (docs/design.md#errors).

    ``get`` and ``enqueue`` are the memory-bank protocol ``PDDMLoss(memory=...)`` relies on (checked by
    duck typing, so the core does not import this class): any object with them works there too.

    Storage is allocated on the first ``enqueue`` with that batch's device and dtype unless
    ``device`` / ``dtype`` are given; later batches are converted to it. The storage is always an
    ordinary tensor, also when that first ``enqueue`` runs under ``torch.inference_mode()`` (a
    validation loop or a trainer's sanity check before training): a bank filled there can be
    written by the training steps after it.

    Not an ``nn.Module``: the bank is training state, not a parameter, and stays out of
    ``state_dict`` and DDP broadcasts. It offers ``nn.Module``'s conversions ``to``, ``cpu``,
    ``cuda``, ``float``, ``double``, ``half``, ``bfloat16`` and ``type`` under the constructor's
    rule: the storage dtype is float32 or float64, so ``half()``, ``bfloat16()`` and ``to()`` /
    ``type()`` with any other dtype raise ``ValueError`` naming ``dtype`` (``TypeError`` for a
    ``dtype`` that is not a ``torch.dtype``) and leave the bank unchanged; labels stay int64.
    """

    def __init__(self, size, dim, *, device=None, dtype=None):
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        _check_dtype(dtype)
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
        # An ordinary tensor even under torch.inference_mode(): an inference tensor could never be
        # written again outside inference mode (the later writes into it are in-place updates).
        with torch.inference_mode(False):
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
        if rows.dtype != embeddings.dtype:  # a float64 batch in a float32 bank: what is stored must be valid too
            V.check_finite(f"embeddings (as the bank's {str(rows.dtype).removeprefix('torch.')})", rows,
                           V.magnitude_limit(rows))
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

    def to(self, *args, **kwargs):
        """Moves and/or casts the storage, with ``torch.Tensor.to``'s arguments (a device, a dtype,
        both, or a tensor to match); returns self. ``ValueError`` naming ``dtype`` for a dtype other
        than float32 / float64 (the constructor's rule: a float16 bank would round every stored row,
        an integer one would store zeros), before anything changes."""
        try:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (RuntimeError, TypeError) as exc:
            raise TypeError(f"MemoryBank.to() takes a device, a dtype or a tensor, as torch.Tensor.to does: {exc}") from None
        return self._convert(device, dtype, non_blocking)

    def _convert(self, device=None, dtype=None, non_blocking=False):
        _check_dtype(dtype)
        if self.embeddings is not None:  # moved first: a move that fails (no such device) changes nothing
            with torch.inference_mode(False):  # the storage stays an ordinary tensor (see _allocate)
                embeddings = self.embeddings.to(device=device, dtype=dtype, non_blocking=non_blocking)
                labels = self.labels.to(device=device, non_blocking=non_blocking)
            self.embeddings, self.labels = embeddings, labels
        elif device is not None:
            torch.empty(0, device=device)  # the same error for a device that cannot be used, bank empty or not
        if device is not None:
            self._device = device
        if dtype is not None:
            self._dtype = dtype
        return self

    def cpu(self):
        """Moves the storage to the CPU; returns self."""
        return self._convert(torch.device("cpu"))

    def cuda(self, device=None):
        """Moves the storage to a CUDA device (the current one by default); returns self."""
        if device is None:
            device = torch.cuda.current_device()
        return self._convert(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))

    def float(self):
        """Casts the storage to float32; returns self."""
        return self._convert(dtype=torch.float32)

    def double(self):
        """Casts the storage to float64; returns self."""
        return self._convert(dtype=torch.float64)

    def half(self):
        """Refused like ``MemoryBank(dtype=torch.float16)``: ``ValueError`` naming ``dtype``."""
        return self._convert(dtype=torch.float16)

    def bfloat16(self):
        """Refused like ``MemoryBank(dtype=torch.bfloat16)``: ``ValueError`` naming ``dtype``."""
        return self._convert(dtype=torch.bfloat16)

    def type(self, dst_type):
        """Casts the storage to ``dst_type`` (a ``torch.dtype``, or a tensor type name such as
        ``"torch.DoubleTensor"``, as ``torch.Tensor.type`` takes), by the rule of :meth:`to`."""
        if isinstance(dst_type, str):
            try:
                probe = torch.empty(0).type(dst_type)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise TypeError(f"dst_type must be a torch.dtype or a tensor type name, got {dst_type!r}: {exc}") from None
            return self._convert(probe.device, probe.dtype)
        if not isinstance(dst_type, torch.dtype):
            raise TypeError(f"dst_type must be a torch.dtype or a tensor type name, got {type(dst_type).__name__}")
        return self._convert(dtype=dst_type)

    def __repr__(self):
        return f"MemoryBank(size={self.size}, dim={self.dim}, filled={self.count})"
