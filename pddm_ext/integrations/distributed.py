"""Mining over the global batch under ``torch.distributed`` (DDP), with each rank's autograd kept local.

Every rank holds a slice x_r of the global batch X = cat(x_0, ..., x_{W-1}) (W = world size).
``all_gather(x_r)`` returns X on every rank, where slice r *is* x_r (its autograd graph kept) and the
other slices are detached copies. Mining on X therefore picks the same quadruplets on every rank as a
single process would on X, and back-propagating the global loss L(X) on rank r yields exactly dL/dx_r:
each rank back-propagates through its own slice only.

How this meets DDP's gradient averaging (``global_batch``, used by ``PDDMLoss(distributed=True)`` and
``GlobalBatchLoss(any_loss)``):

* DDP all-reduces gradients and divides by W.
* The backbone's gradient is a sum over slices, dL/dphi = sum_r dL/dx_r dx_r/dphi, and rank r holds
  only term r. So the loss scales the gradient reaching the local slice by W (``scale_grad``; the
  loss *value* is untouched): rank r holds W dL/dx_r dx_r/dphi and DDP's average is the sum.
* The PDDM unit's parameters theta enter every pair score, and every rank scores all gathered rows,
  so every rank computes the full dL/dtheta; DDP's average of W identical copies is dL/dtheta.
* The returned value is L itself (the mean over the global quadruplets), the same on every rank and
  equal to the single-process loss on X.

After DDP's all-reduce every parameter's ``.grad`` equals single-process training on X (the unit's
parameters must be reduced by DDP too: wrap the loss, or a module holding it, in DDP). The embeddings'
own ``.grad`` on rank r is W dL/dx_r.

For a training script under ``torchrun`` (what ``pddm-ext train`` uses): ``init_from_env`` joins the
process group, ``ShardedBatchSampler`` gives each rank its share of every P x K batch, ``close`` ends.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .. import _validate as V


def is_distributed():
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None):
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None):
    return dist.get_rank(group) if is_distributed() else 0


def all_gather(tensor, group=None):
    """Concatenates every rank's ``tensor`` along dim 0, in rank order, on every rank.

    The local slice is ``tensor`` itself, so autograd flows into it; the other ranks' slices are
    detached. Ranks may hold different numbers of rows (other dims must match). Without an
    initialised process group (or with one rank) returns ``tensor`` unchanged.
    """
    V.check_tensor("tensor", tensor)
    if world_size(group) == 1:
        return tensor
    n_ranks, me = dist.get_world_size(group), dist.get_rank(group)
    rows = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    all_rows = [torch.empty_like(rows) for _ in range(n_ranks)]
    dist.all_gather(all_rows, rows, group=group)
    all_rows = [int(r) for r in all_rows]
    longest = max(all_rows)
    padded = tensor.detach()
    if padded.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
        padded = torch.cat([padded, padded.new_zeros((longest - padded.shape[0],) + tuple(padded.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    parts = [p[:r] for p, r in zip(parts, all_rows)]
    parts[me] = tensor
    return torch.cat(parts)


def gather_embeddings_and_labels(embeddings, labels, group=None):
    """``(all_gather(embeddings), all_gather(labels))``; labels become int64 on the embeddings' device.

    Returns the global batch in rank order, the local slice keeping its autograd graph.
    """
    V.check_embeddings("embeddings", embeddings)
    labels = V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
    return all_gather(embeddings, group), all_gather(labels, group)


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



def global_batch(embeddings, labels, group=None):
    """The global batch for a loss: ``(all_gather(scale_grad(embeddings, W)), all_gather(labels))``.

    A loss of the global batch computed on every rank and back-propagated from each then gives
    DDP-averaged gradients equal to single-process training on the concatenated batch (module
    docstring). ``PDDMLoss(distributed=True)`` does exactly this after normalising.
    """
    return gather_embeddings_and_labels(scale_grad(embeddings, world_size(group)), labels, group)


class GlobalBatchLoss(torch.nn.Module):
    """Wraps any loss ``loss(embeddings, labels)`` so that it sees the global batch of all ranks
    (``global_batch``): the way to make a loss without a ``distributed=`` option mine over every
    rank's embeddings. Without a process group it is the wrapped loss. ``.loss`` is the wrapped one."""

    def __init__(self, loss, group=None):
        super().__init__()
        self.loss = loss
        self.group = group

    def forward(self, embeddings, labels):
        return self.loss(*global_batch(embeddings, labels, self.group))


def shard(batch, group=None):
    """This rank's share of a global batch (a sequence of item indices): items rank, rank + W, ...

    Every rank draws the same global batch (same sampler seed) and keeps its share; all_gather then
    restores the global batch up to a permutation of its rows, which the losses do not depend on."""
    return batch[rank(group)::world_size(group)]


def init_from_env(device=None):
    """Joins the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    nccl for CUDA, gloo for CPU; on CUDA each rank takes GPU ``LOCAL_RANK``. Returns the device to
    train on. A no-op (returning ``device``) in a single process or when already initialised."""
    device = torch.device(device) if device is not None else None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    global _joined_here
    if device is not None and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _joined_here = True
    return device


_joined_here = False  # whether init_from_env started the process group (close() then ends it)


class ShardedBatchSampler:
    """Wraps a batch sampler (e.g. ``PKSampler``): yields this rank's ``shard`` of every batch.

    Every rank builds the same sampler with the same seed, so they draw the same global P x K batch
    and each keeps its share. ``len`` is the wrapped sampler's; usable as ``DataLoader(batch_sampler=...)``."""

    def __init__(self, batch_sampler, group=None):
        self.batch_sampler, self.group = batch_sampler, group

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield shard(batch, self.group)


def close():
    """Waits for every rank, then leaves the process group if ``init_from_env`` started it (a group
    the caller set up stays up for the caller)."""
    global _joined_here
    if is_distributed():
        dist.barrier()
        if _joined_here:
            dist.destroy_process_group()
            _joined_here = False
