"""The ``torch.distributed`` primitives the core needs to mine over the global batch.

``PDDMLoss(distributed=True)`` uses these; ``pddm_ext.integrations.distributed`` re-exports them and
builds the trainer-facing helpers (``GlobalBatchLoss``, ``ShardedBatchSampler``, ``init_from_env``) on
them, so the core never imports the integrations. The gradient scaling that makes DDP's average equal
single-process training is derived in that module's docstring.

Every collective here is called by every rank in the same order, whatever a rank's input:

1. :func:`agree_on_batch` validates the local shard, then all ranks exchange one small status
   vector (failed?, rows, features, dtype, non-finite?). If any rank's input is bad, every rank raises
   the same error (the lowest failing rank's message, its rank named) before any gathering starts, so
   no rank is left waiting in a collective the others never reach. A caller's other checks whose
   outcome may differ between ranks (``PDDMLoss``'s arguments, parameters and memory bank) run inside
   this exchange too (``check=``, ``same=``). An empty local shard (0 rows, the right number of
   features) is legal as long as the global batch has a row.
2. :func:`all_gather` (which first exchanges a header of its own: a tensor at all, rows, dtype,
   shape) then concatenates the shards in rank order (padding to the longest shard, since
   ``all_gather`` needs equal shapes); the local slice is the input itself, so autograd flows into it.

Without an initialised process group (or with one rank) every function is the identity / a
single-process check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _validate as V


def is_distributed():
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None):
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None):
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def all_ranks(flag, group=None):
    """True when ``flag`` (a bool, or a 0-dim bool tensor) holds on every rank of ``group``: one
    all_reduce (MIN), so every rank takes the same branch after it; ``bool(flag)`` without a process group."""
    if world_size(group) == 1:
        return bool(flag)
    status = torch.tensor(int(bool(flag)), dtype=torch.int32, device=_status_device(group))
    dist.all_reduce(status, op=dist.ReduceOp.MIN, group=group)
    return bool(status)


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


# Every dtype torch knows, in a fixed order: the exchanged headers and statuses name a dtype by its index here.
_ALL_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))


def _raise_agreed(failed, mine, n_ranks, group):
    """Collective error path: every rank calls it when the exchanged statuses show that the ranks in
    ``failed`` (sorted) had a problem; ``mine`` is this rank's own (exception class, message) or None.
    Every rank then raises the lowest failing rank's error, naming that rank."""
    messages = [None] * n_ranks
    dist.all_gather_object(messages, mine, group=group)
    is_type_error, message = messages[failed[0]]
    raise (TypeError if is_type_error else ValueError)(f"{message} (on rank {failed[0]} of {n_ranks})")


def _as_message(problem):
    return None if problem is None else (isinstance(problem, TypeError), str(problem))


def all_gather(tensor, group=None):
    """Concatenates every rank's ``tensor`` along dim 0, in rank order, on every rank.

    The local slice is ``tensor`` itself, so autograd flows into it; the other ranks' slices are
    detached. Ranks may hold different numbers of rows; the other dims and the dtype must match.
    Collective: the ranks first exchange a small header (rows, dtype, shape), so a ``tensor`` that is
    not a tensor or is 0-dim (``TypeError`` / ``ValueError`` naming ``tensor``), or that differs from
    the other ranks' in dtype or trailing shape (``ValueError``), raises the same error on every rank,
    naming the rank, instead of leaving the others waiting in ``all_gather``. Without an initialised
    process group (or with one rank) returns ``tensor`` unchanged (after the same local checks).
    """
    problem = None
    try:
        V.check_tensor("tensor", tensor)
        if tensor.dim() == 0:
            raise ValueError("tensor must have at least one dimension (rows), got a 0-dim tensor")
    except (TypeError, ValueError) as exc:
        problem = exc
    if world_size(group) == 1:
        if problem is not None:
            raise problem
        return tensor
    n_ranks, device = dist.get_world_size(group), _status_device(group)
    header = torch.tensor([1, 0, 0, 0] if problem is not None else
                          [0, tensor.shape[0], _ALL_DTYPES.index(tensor.dtype), tensor.dim()],
                          dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(n_ranks)]
    dist.all_gather(headers, header, group=group)
    headers = [h.tolist() for h in headers]
    failed = [r for r, h in enumerate(headers) if h[0]]
    if failed:
        _raise_agreed(failed, _as_message(problem), n_ranks, group)
    if len({h[2] for h in headers}) > 1:
        raise ValueError(f"tensor has a different dtype on different ranks: {[str(_ALL_DTYPES[h[2]]) for h in headers]}")
    if len({h[3] for h in headers}) > 1:
        raise ValueError(f"tensor has a different number of dimensions on different ranks: {[h[3] for h in headers]}")
    if tensor.dim() > 1:  # the trailing shape: one length on every rank, since the dims agree
        shape = torch.tensor(tensor.shape[1:], dtype=torch.int64, device=device)
        shapes = [torch.empty_like(shape) for _ in range(n_ranks)]
        dist.all_gather(shapes, shape, group=group)
        shapes = [tuple(t.tolist()) for t in shapes]
        if len(set(shapes)) > 1:
            raise ValueError(f"tensor has a different shape beyond dim 0 on different ranks: {shapes}")
    return _gather_rows(tensor, [h[1] for h in headers], group)


def _check_shard(embeddings, labels, d, d_from, names):
    """The local shard's structural checks (raised): a (rows, d) floating tensor, rows >= 0, and
    integer labels of length rows."""
    emb, lab = names
    V.check_float(emb, embeddings)
    if embeddings.dim() != 2:
        raise ValueError(f"{emb} must be 2-D (rows, features), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{emb} has no features: got shape {tuple(embeddings.shape)}")
    if d is not None and embeddings.shape[1] != d:
        raise ValueError(f"{emb} has {embeddings.shape[1]} features, expected {d} to match {d_from}")
    V.check_labels(lab, labels, embeddings.shape[0], embeddings.device)


def _first_nonfinite(named, device):
    """0-dim int64 on ``device``: 0 when every tensor of ``named`` [(name, tensor[, limit])] is finite
    (and within its magnitude ``limit``, when given: ``_validate.finite_condition``), else 1 + the
    position of the first that is not (no host read)."""
    flags = [~V.finite_condition(t, *limit) if t.numel() else torch.tensor(False, device=t.device)
             for _, t, *limit in named]
    if not flags:
        return torch.zeros((), dtype=torch.int64, device=device)
    flags = torch.stack([f.to(device) for f in flags])
    return torch.where(flags.any(), flags.to(torch.int64).argmax() + 1, torch.zeros_like(flags[0], dtype=torch.int64))


def agree_on_batch(embeddings, labels, group=None, *, d=None, d_from=None, names=("embeddings", "labels"),
                   check=None, same=None):
    """Validates this rank's shard and agrees with every rank that the global batch is valid.

    Collective (every rank must call it). ``embeddings``: (rows, d) floating tensor, rows >= 0;
    ``labels``: 1-D integer tensor of length rows. Returns ``(labels as int64, rows per rank)``.
    Raises on every rank alike (``ValueError``, or ``TypeError`` for a wrong type, the message naming
    the argument and the failing rank) when any rank's shard is bad, the ranks disagree on the number
    of features or the dtype, a shard contains NaN or Inf, or the global batch has no row.

    A caller whose other arguments may differ between ranks checks them inside this agreement, so
    that no rank raises alone (and leaves the others waiting in a later collective):

    - ``names``: the names of the two arguments in the messages (e.g. ``("ref_emb", "ref_labels")``);
    - ``check``: a callable run on this rank after its shard passed the structural checks; it raises
      ``TypeError`` / ``ValueError`` for a problem (reported like a bad shard) and returns a list of
      ``(name, tensor)`` or ``(name, tensor, magnitude limit)`` whose finiteness is agreed on too (the
      error then names the tensor);
    - ``same``: a dict ``{name: bool}`` that must hold the same values on every rank (e.g. whether an
      optional argument is given), else every rank raises a ``ValueError`` naming it.

    Without a process group: the single-process checks (an empty batch is then an error).
    """
    same = dict(same or {})
    if world_size(group) == 1:
        V.check_embeddings(names[0], embeddings, d=d, d_from=d_from)
        labels = V.check_labels(names[1], labels, embeddings.shape[0], embeddings.device)
        for name, t, *limit in (check() if check is not None else ()):
            V.check_finite(name, t, *limit)
        return labels, [embeddings.shape[0]]
    n_ranks, device = dist.get_world_size(group), _status_device(group)
    problem, finite = None, []
    try:
        _check_shard(embeddings, labels, d, d_from, names)
        if check is not None:
            finite = list(check())
    except (TypeError, ValueError) as exc:
        problem = exc
    # status: failed?, rows, features, dtype, first non-finite tensor (0: none), then the `same` values
    status = torch.zeros(5 + len(same), dtype=torch.int64, device=device)
    status[5:] = torch.tensor([int(bool(v)) for v in same.values()], dtype=torch.int64)
    named = [(names[0], embeddings)] + finite
    if problem is None:  # the shard's structure is valid: (rows, d), d >= 1, floating
        named[0] = (names[0], embeddings, V.magnitude_limit(embeddings))
        status[1:4] = torch.tensor([embeddings.shape[0], embeddings.shape[1], _ALL_DTYPES.index(embeddings.dtype)])
        status[4] = _first_nonfinite(named, device)
    else:
        status[0] = 1
    statuses = [torch.empty_like(status) for _ in range(n_ranks)]
    dist.all_gather(statuses, status, group=group)  # the one host read of this step's collectives
    statuses = [s.tolist() for s in statuses]
    failed = [r for r, s in enumerate(statuses) if s[0]]
    if failed:
        _raise_agreed(failed, _as_message(problem), n_ranks, group)
    widths = {s[2] for s in statuses}
    if len(widths) > 1:
        raise ValueError(f"{names[0]} has a different number of features on different ranks: {[s[2] for s in statuses]}")
    if len({s[3] for s in statuses}) > 1:
        raise ValueError(f"{names[0]} has a different dtype on different ranks")
    for position, name in enumerate(same):
        given = [r for r, s in enumerate(statuses) if s[5 + position]]
        if 0 < len(given) < n_ranks:
            missing = [r for r in range(n_ranks) if r not in given]
            raise ValueError(f"{name} is given on rank(s) {given} but not on rank(s) {missing}: "
                             "pass it on every rank or on none")
    bad = [r for r, s in enumerate(statuses) if s[4]]
    if bad:
        code = statuses[dist.get_rank(group)][4]
        mine = None if code == 0 else (False, V.finite_message(*named[code - 1]))
        _raise_agreed(bad, mine, n_ranks, group)
    rows = [s[1] for s in statuses]
    if sum(rows) == 0:
        raise ValueError(f"{names[0]} is empty on every rank: expected at least one row in the global batch")
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
