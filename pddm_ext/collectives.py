"""The ``torch.distributed`` primitives the core needs to mine over the global batch.

``PDDMLoss(distributed=True)`` uses these; ``pddm_ext.integrations.distributed`` re-exports them and
builds the trainer-facing helpers (``GlobalBatchLoss``, ``ShardedBatchSampler``, ``init_from_env``) on
them, so the core never imports the integrations. The gradient scaling that makes DDP's average equal
single-process training is derived in that module's docstring.

Every collective here is called by every rank in the same order, whatever a rank's input:

1. :func:`agree_on_batch` validates the local shard, then all ranks exchange one small status
   vector (failed?, rows, features, dtype, non-finite?). If any rank's input is bad, every rank raises
   the same error (the lowest failing rank's message, its rank named) before any gathering starts, so
   no rank is left waiting in a collective the others never reach. An empty local shard (0 rows, the
   right number of features) is legal as long as the global batch has a row.
2. :func:`all_gather` then concatenates the shards in rank order (padding to the longest shard, since
   ``all_gather`` needs equal shapes); the local slice is the input itself, so autograd flows into it.

Without an initialised process group (or with one rank) every function is the identity / a
single-process check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _validate as V

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def is_distributed():
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None):
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None):
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def _status_device(group):
    # NCCL only moves CUDA tensors; every other backend takes CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(tensor, rows, group):
    """all_gather of ``tensor`` (rows[r] rows on rank r, other dims equal) in rank order, the local
    slice kept as ``tensor`` itself (autograd flows into it), the others detached."""
    me, longest = dist.get_rank(group), max(rows)
    padded = tensor.detach()
    if padded.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
        padded = torch.cat([padded, padded.new_zeros((longest - padded.shape[0],) + tuple(padded.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous(), group=group)
    parts = [p[:r] for p, r in zip(parts, rows)]
    parts[me] = tensor
    return torch.cat(parts)


def all_gather(tensor, group=None):
    """Concatenates every rank's ``tensor`` along dim 0, in rank order, on every rank.

    The local slice is ``tensor`` itself, so autograd flows into it; the other ranks' slices are
    detached. Ranks may hold different numbers of rows (other dims must match). Without an
    initialised process group (or with one rank) returns ``tensor`` unchanged. Raises ``TypeError``
    (on this rank, before any collective) when ``tensor`` is not a tensor.
    """
    V.check_tensor("tensor", tensor)
    if world_size(group) == 1:
        return tensor
    count = torch.tensor([tensor.shape[0] if tensor.dim() else 1], dtype=torch.int64, device=_status_device(group))
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    return _gather_rows(tensor, [int(c) for c in counts], group)


def _local_problem(embeddings, labels, d, d_from):
    """The local shard's first structural error (an exception, not raised), or None."""
    try:
        V.check_float("embeddings", embeddings)
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (rows, features), got shape {tuple(embeddings.shape)}")
        if embeddings.shape[1] == 0:
            raise ValueError(f"embeddings has no features: got shape {tuple(embeddings.shape)}")
        if d is not None and embeddings.shape[1] != d:
            raise ValueError(f"embeddings has {embeddings.shape[1]} features, expected {d} to match {d_from}")
        V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
    except (TypeError, ValueError) as exc:
        return exc
    return None


def agree_on_batch(embeddings, labels, group=None, *, d=None, d_from=None):
    """Validates this rank's shard and agrees with every rank that the global batch is valid.

    Collective (every rank must call it). ``embeddings``: (rows, d) floating tensor, rows >= 0;
    ``labels``: 1-D integer tensor of length rows. Returns ``(labels as int64, rows per rank)``.
    Raises on every rank alike (``ValueError``, or ``TypeError`` for a wrong type, the message naming
    the argument and the failing rank) when any rank's shard is bad, the ranks disagree on the number
    of features or the dtype, a shard contains NaN or Inf, or the global batch has no row.
    Without a process group: the single-process checks (an empty batch is then an error).
    """
    if world_size(group) == 1:
        V.check_embeddings("embeddings", embeddings, d=d, d_from=d_from)
        return V.check_labels("labels", labels, embeddings.shape[0], embeddings.device), [embeddings.shape[0]]
    n_ranks, device = dist.get_world_size(group), _status_device(group)
    problem = _local_problem(embeddings, labels, d, d_from)
    status = torch.zeros(5, dtype=torch.int64, device=device)
    if problem is None:
        nonfinite = ~torch.isfinite(embeddings).all() if embeddings.numel() else torch.tensor(False)
        status[1:4] = torch.tensor([embeddings.shape[0], embeddings.shape[1], _DTYPE_CODES[embeddings.dtype]])
        status[4] = nonfinite.to(device=device, dtype=torch.int64)
    else:
        status[0] = 1
    statuses = [torch.empty_like(status) for _ in range(n_ranks)]
    dist.all_gather(statuses, status, group=group)  # the one host read of this step's collectives
    statuses = [s.tolist() for s in statuses]
    failed = [r for r, s in enumerate(statuses) if s[0]]
    if failed:
        messages = [None] * n_ranks
        mine = None if problem is None else (type(problem) is TypeError, str(problem))
        dist.all_gather_object(messages, mine, group=group)
        is_type_error, message = messages[failed[0]]
        raise (TypeError if is_type_error else ValueError)(f"{message} (on rank {failed[0]} of {n_ranks})")
    widths = {s[2] for s in statuses}
    if len(widths) > 1:
        raise ValueError(f"embeddings has a different number of features on different ranks: {[s[2] for s in statuses]}")
    if len({s[3] for s in statuses}) > 1:
        raise ValueError("embeddings has a different dtype on different ranks")
    bad = [r for r, s in enumerate(statuses) if s[4]]
    if bad:
        raise ValueError(f"embeddings contains NaN or Inf (on rank {bad[0]} of {n_ranks})")
    rows = [s[1] for s in statuses]
    if sum(rows) == 0:
        raise ValueError(f"embeddings is empty on every rank: expected at least one row in the global batch")
    return labels.to(device=embeddings.device, dtype=torch.int64), rows


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x, factor):
    """``x`` unchanged in value, its gradient multiplied by ``factor`` on the way back."""
    if factor == 1:
        return x
    return _ScaleGrad.apply(x, float(factor))


def global_batch(embeddings, labels, group=None, *, rows=None):
    """The global batch for a loss: ``(all_gather(scale_grad(embeddings, W)), all_gather(labels))``.

    Collective. Validates first with :func:`agree_on_batch` (so a bad shard raises the same error on
    every rank, never a hang) unless ``rows`` (its result, the rows per rank) is given by a caller that
    already agreed. A loss of the global batch computed on every rank and back-propagated from each
    then gives DDP-averaged gradients equal to single-process training on the concatenated batch
    (``pddm_ext.integrations.distributed``). Without a process group: ``(embeddings, labels)``.
    """
    if world_size(group) == 1:
        if rows is None:
            labels, rows = agree_on_batch(embeddings, labels, group)
        return embeddings, labels
    if rows is None:
        labels, rows = agree_on_batch(embeddings, labels, group)
    else:
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
    scaled = scale_grad(embeddings, world_size(group))
    return _gather_rows(scaled, rows, group), _gather_rows(labels, rows, group)
