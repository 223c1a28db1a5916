"""Trainer integrations: wrappers around the core library for existing training setups.

``miners.PDDMMiner`` (a pytorch-metric-learning miner), ``memory.MemoryBank`` (mining against past
batches, cross-batch memory) and ``distributed`` (mining over the global batch under
torch.distributed). They depend on the core (``pddm_ext``); the core never imports them.
"""
