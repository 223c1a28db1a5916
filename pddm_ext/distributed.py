"""Kept for ``import pddm_ext.distributed``: the module is ``pddm_ext.integrations.distributed``."""

import sys

from .integrations import distributed as _distributed

sys.modules[__name__] = _distributed
