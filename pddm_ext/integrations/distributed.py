"""Mining over the global batch under ``torch.distributed`` (DDP), with each rank's autograd kept local.

Every rank holds a slice x_r of the global batch X = cat(x_0, ..., x_{W-1}) (W = world size).
``all_gather(x_r)`` returns X on every rank, where slice r *is* x_r (its autograd graph kept) and the
other slices are detached copies. Mining on X therefore picks the same quadruplets on every rank as a
single process would on X, and back-propagating the global loss L(X) on rank r yields exactly dL/dx_r:
each rank back-propagates through its own slice only.

The primitives (``all_gather``, ``scale_grad``, ``global_batch``, ``agree_on_batch``) live in the core
(``pddm_ext.collectives``, which ``PDDMLoss(distributed=True)`` uses) and are re-exported here; this
module adds what a training script needs around them. Every collective first agrees on the validity
of all ranks' inputs, so an input that is bad on one rank raises the same error on every rank instead
of leaving the others blocked in ``all_gather``; an empty shard inside a non-empty global batch is legal.

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

from .. import collectives as _collectives
from ..collectives import (  # noqa: F401  (the core's primitives, re-exported here)
    agree_on_batch,
    all_gather,
    global_batch,
    is_distributed,
    rank,
    scale_grad,
    world_size,
)


def gather_embeddings_and_labels(embeddings, labels, group=None):
    """``(all_gather(embeddings), all_gather(labels))``; labels become int64 on the embeddings' device.

    Collective: validated on every rank alike first (``agree_on_batch``: a bad shard raises the same
    error on every rank; an empty shard in a non-empty global batch is legal). Returns the global
    batch in rank order, the local slice keeping its autograd graph.
    """
    labels, rows = agree_on_batch(embeddings, labels, group)
    if world_size(group) == 1:
        return embeddings, labels
    return _collectives._gather_rows(embeddings, rows, group), _collectives._gather_rows(labels, rows, group)


class GlobalBatchLoss(torch.nn.Module):
    """Wraps any loss ``loss(embeddings, labels)`` so that it sees the global batch of all ranks
    (``global_batch``): the way to make a loss without a ``distributed=`` option mine over every
    rank's embeddings. Without a process group it is the wrapped loss. ``.loss`` is the wrapped one.

    The shards are agreed on before anything is gathered (a bad shard raises on every rank). The
    wrapped loss then runs on the same global batch on every rank, so its own checks of that batch
    agree too; checks of state a rank keeps for itself (a memory bank, parameters DDP does not
    synchronise) are the wrapped loss's and are not agreed on: for ``PDDMLoss`` use
    ``PDDMLoss(distributed=True)``, which agrees on them as well."""

    def __init__(self, loss, group=None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(embeddings, labels) such as an nn.Module, got "
                            f"{type(loss).__name__}")
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
