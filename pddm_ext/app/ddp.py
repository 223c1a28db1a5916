"""Everything DDP of the training run in one place (``torchrun --nproc_per_node N pddm-ext train ...``).

Every rank draws the same P x K batch and takes its share (``pddm_ext.distributed.ShardedBatchSampler``);
the loss sees the global batch (``GlobalBatchLoss``: all ranks' embeddings, each rank back-propagating
through its own) and DDP averages the gradients, so a step equals one single-process step on the whole
batch (up to BatchNorm statistics on CPU: see :func:`wrap`). ``train.Run`` calls :func:`init` and
:func:`wrap` in its setup and :func:`close` at the end; in one process all three change nothing.
"""

from __future__ import annotations

import torch.nn as nn

from ..integrations import distributed as dist_


def init(device):
    """Joins torchrun's process group (a no-op in one process); returns (device, world size)."""
    device = dist_.init_from_env(device)
    return device, dist_.world_size()


def wrap(model, loss_fn, sampler, device, world):
    """Under torchrun (world > 1): DDP around the model and around the loss over the global batch
    (when it has parameters: the PDDM unit), and this rank's share of every batch. Else unchanged.

    Exact equivalence with one process on the whole batch holds for everything but BatchNorm: on
    CUDA it becomes SyncBatchNorm; on CPU (gloo) each rank normalises with its own share's statistics."""
    if world == 1:
        return model, loss_fn, sampler
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    if device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm is CUDA-only)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    global_loss = dist_.GlobalBatchLoss(loss_fn)
    if any(p.requires_grad for p in loss_fn.parameters()):
        global_loss = DDP(global_loss, device_ids=device_ids)
    return DDP(model, device_ids=device_ids), global_loss, dist_.ShardedBatchSampler(sampler)


def close(world):
    """Leaves the process group that :func:`init` joined (a no-op in one process)."""
    if world > 1:
        dist_.close()
