"""Shared fixtures and helpers of the pddm_ext test suite (CPU)."""

from __future__ import annotations

import pytest
import torch

import pddm_ext

# Tolerances of docs/design.md#ties-and-tolerance for "a mined index is correct": its reference score is within
# tol * (1 + |best|) of the reference optimum of its slot.
MINING_TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def make_unit(d, h=None, c=None, *, dtype=torch.float64, seed=0):
    """A PDDM unit with nn.Linear-style random parameters, reproducible from `seed`."""
    torch.manual_seed(seed)
    return pddm_ext.PDDM(d, h, c, dtype=dtype)


def ref_params(unit, dtype=torch.float64):
    """The unit's parameters, detached and cast to `dtype` (the reference runs in float64)."""
    return tuple(p.detach().to(dtype) for p in unit.params())


def randn(*shape, dtype=torch.float64, seed=None):
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g)


_DEFAULT_THREADS = torch.get_num_threads()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multithreaded: run with at least 2 intra-op threads (tiles split between threads, "
        "per-thread partial results merged)"
    )


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Seeds every test; runs small tests on one thread. On a busy machine an OpenMP parallel region
    around a one-tile problem costs milliseconds of barrier waits, so only the tests marked
    ``multithreaded`` (sizes spanning many tiles, where the thread split matters) use 2+ threads."""
    torch.manual_seed(1234)
    threads = max(2, _DEFAULT_THREADS) if request.node.get_closest_marker("multithreaded") else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(previous)
