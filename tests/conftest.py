"""Fixtures and hooks of the pddm_ext test suite; the shared helpers are in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICES

_DEFAULT_THREADS = torch.get_num_threads()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multithreaded: run with at least 2 intra-op threads (tiles split between threads, "
        "per-thread partial results merged)"
    )


@pytest.fixture(params=DEVICES)
def device(request):
    """The device of the tensors a test gives the kernels: "cpu" (the CPU kernels), "cuda" (a GPU with a CUDA
    build), or "cpu" with the id ``emulated`` in the CUDA emulation build (the CUDA kernels run for CPU
    tensors). tests/helpers.py says which a build has."""
    return request.param


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
