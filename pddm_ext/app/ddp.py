class _distribute:
    """Everything DDP in one place (``torchrun --nproc_per_node N pddm-ext train ...``)."""

    @staticmethod
    def init(device):
        """Joins torchrun's process group (a no-op in one process); returns (device, world size)."""
        device = dist_.init_from_env(device)
        return device, dist_.world_size()

    @staticmethod
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

    @staticmethod
    def close(world):
        if world > 1:
            dist_.close()
