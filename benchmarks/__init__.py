"""pddm_ext's benchmark suite: fused kernels vs the plain-PyTorch reference, torch.compile of it,
and pytorch-metric-learning's BatchHardMiner. Run ``python -m benchmarks --help``."""
