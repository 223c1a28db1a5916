"""Kept for ``pddm_ext.data.PKSampler`` and ``pddm_ext.data.load_dataset``: the sampler is
``pddm_ext.sampler.PKSampler`` (core), the datasets are ``pddm_ext.app.datasets`` (application)."""

import sys

from .app import datasets as _datasets

sys.modules[__name__] = _datasets
