"""What the tests share: the devices the kernels run on, dtypes, units, inputs, tolerances and error measures.

Devices (``DEVICES``, the ``device`` fixture of conftest.py): the CPU kernels (``cpu``) in a CPU build; in a
CUDA build on a machine with a GPU also ``cuda``; in the CUDA emulation build (``make cuda-emulate``,
docs/emulation.md) only ``emulated``, whose tensors live on the CPU and run the kernels of csrc/cuda/ (that
build has no CPU kernels). The tests of scores, gradients, mining and the unit forms take the ``device``
fixture, so one file checks every backend. ``GPU_BACKENDS`` (the ``device`` fixture of tests/test_cuda.py)
are the CUDA kernels alone: ``cuda`` or ``emulated``, skipped in a CPU build.

Imported as a module of tests/ (pytest puts that folder on sys.path): ``from helpers import make_unit``.
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import reference

EMULATED = bool(getattr(pddm_ext._C, "cuda_emulation", False))
HAS_CUDA = torch.cuda.is_available() and bool(pddm_ext._C.with_cuda)

if EMULATED:
    DEVICES = [pytest.param("cpu", id="emulated")]
    GPU_BACKENDS = [pytest.param("cpu", id="emulated")]
else:
    DEVICES = [pytest.param("cpu", id="cpu")] + ([pytest.param("cuda", id="cuda")] if HAS_CUDA else [])
    GPU_BACKENDS = [pytest.param("cuda", id="cuda", marks=() if HAS_CUDA else pytest.mark.skip(
        reason="no CUDA device visible and not the emulation build (make cuda-emulate runs these on the CPU)"))]

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of pddm_ext")
needs_emulation = pytest.mark.skipif(not EMULATED, reason="not the CUDA emulation build (make cuda-emulate)")
# A property of the CPU kernels (their arithmetic or their thread split), which the emulation build, whose
# CPU tensors run the CUDA kernels, does not have.
cpu_kernels_only = pytest.mark.skipif(EMULATED, reason="a property of the CPU kernels: the emulation build runs "
                                      "the CUDA kernels for CPU tensors")

FLOATS = [torch.float64, torch.float32]
HALF = [torch.float16, torch.bfloat16]

# Scores and gradients against the float64 reference, as rel_err (the largest difference relative to 1 + the
# largest reference magnitude): the fused kernels sum in another order.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
# docs/design.md#ties-and-tolerance, "a mined index is correct": its reference score is within
# tol * (1 + |best|) of the reference optimum of its slot.
MINING_TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def make_unit(d, h=None, c=None, *, dtype=torch.float64, seed=0, device="cpu"):
    """A PDDM unit with nn.Linear-style random parameters of `dtype`, reproducible from `seed`, on `device`
    (drawn on the CPU: the same values on every device)."""
    torch.manual_seed(seed)
    return pddm_ext.PDDM(d, h, c, dtype=dtype).to(device)


def ref_params(unit, dtype=torch.float64):
    """The unit's parameters, detached and cast to `dtype` (the reference runs in float64)."""
    return tuple(p.detach().to(dtype) for p in unit.params())


def params_of(unit):
    """The unit's parameters, detached, in their own dtype and device (the order of reference.PARAM_NAMES)."""
    return tuple(getattr(unit, name).detach() for name in reference.PARAM_NAMES)


def randn(*shape, dtype=torch.float64, seed=None, device="cpu"):
    """Standard normal values drawn on the CPU (from a generator seeded with `seed`, else the global one),
    then moved to `device`: the same values on every device."""
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g).to(device)


def rel_err(a, b):
    """max |a - b| / (1 + max |b|), in float64 (b: the reference)."""
    return ((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item()


def assert_scores_close(S, S_ref, dtype):
    """Scores against the float64 reference: float64 within 1e-10 (absolute and relative) element by element;
    float32 (and half inputs, computed in float32 or finer) within 1e-4 relative plus 1e-4 of the score scale
    (max(1, max |S_ref|))."""
    S_ref = S_ref.to(torch.float64).to(S.device)
    if dtype == torch.float64:
        torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    else:
        scale = max(1.0, S_ref.abs().max().item())
        torch.testing.assert_close(S.to(torch.float64), S_ref, rtol=1e-4, atol=1e-4 * scale)


def reference_gradients(x, y, unit, G):
    """The float64 reference's scores and gradients of sum(S * G) in x, y (reference mode, y not None) and the
    unit's parameters, in that order."""
    xd = x.detach().double().requires_grad_()
    yd = None if y is None else y.detach().double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params_of(unit)]
    R = reference.pddm_scores(xd, yd, pd)
    return R, torch.autograd.grad((R * G.double()).sum(), [xd] + ([] if yd is None else [yd]) + pd)
