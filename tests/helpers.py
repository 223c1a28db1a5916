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
from pddm_ext import ops, reference

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
# Unit roundoff of half tile products' operands: float16 keeps 10 explicit mantissa bits, bfloat16 7.
HALF_U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# (m, n, d, h, c) the CUDA kernels find awkward: d = h = c = 1, sizes that are not multiples of the tensor-core
# fragments (16 x 16 x 8) nor of the 8 x 8 pair tiles, h or c above 128 (two output passes of the
# tensor-core block); run in batch and in reference mode.
ODD_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 4, 3, 2), (9, 17, 20, 130, 7), (16, 8, 33, 17, 129), (65, 130, 64, 64, 64)]

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


def check_bank_mining(x, lx, y, ly, params, k, chunk):
    """ops.mine in reference mode against per-row optima of fused scores computed chunk by chunk (each
    chunk's (m, chunk) matrix only, so a bank far larger than m * n floats can be checked)."""
    m, n = x.shape[0], y.shape[0]
    hp, hp_s, hn, hn_s, hnr, hnr_s, pi, pr, ps = ops.mine(x, lx, y, ly, params, k)
    best_pos = torch.full((m,), float("inf"), device=x.device)
    best_neg = torch.full((m,), -float("inf"), device=x.device)
    all_pos = []
    for start in range(0, n, chunk):
        yc, lc = y[start:start + chunk], ly[start:start + chunk]
        S = ops.scores(x, yc, *params)
        same = lx[:, None] == lc[None, :]
        best_pos = torch.minimum(best_pos, torch.where(same, S, float("inf")).min(1).values)
        best_neg = torch.maximum(best_neg, torch.where(same, -float("inf"), S).max(1).values)
        i, r = same.nonzero(as_tuple=True)
        all_pos.append(S[i, r])
        del S
    tol = 1e-4
    has_pos = torch.isfinite(best_pos)
    assert torch.equal(hp >= 0, has_pos)
    assert bool(((hp_s[has_pos] - best_pos[has_pos]).abs() <= tol * (1 + best_pos[has_pos].abs())).all())
    assert bool(((hn_s - best_neg).abs() <= tol * (1 + best_neg.abs())).all())
    # hp and hn index the bank (one entry per query), hnr the queries (one entry per bank row).
    assert hp.shape == hn.shape == (m,) and hnr.shape == (n,)
    assert int(hp.max()) < n and int(hn.min()) >= 0 and int(hn.max()) < n and int(hnr.max()) < m
    assert bool((lx[has_pos] == ly[hp[has_pos]]).all())
    assert bool((lx != ly[hn]).all())
    kth = torch.sort(torch.cat(all_pos)).values[k - 1]
    assert pi.numel() == k and bool((ps <= kth + tol * (1 + kth.abs())).all())
    assert bool((lx[pi] == ly[pr]).all())


def bank_case(m, n, d, device, classes=1000):
    torch.manual_seed(0)
    unit = make_unit(d, 4, 4, device=device, dtype=torch.float32)
    x = torch.randn(m, d, device=device)
    y = torch.randn(n, d, device=device)
    lx = torch.randint(0, classes, (m,), device=device)
    ly = torch.randint(0, classes, (n,), device=device)
    ly[-1] = lx[0]  # a positive pair at the very end of the bank
    return x, lx, y, ly, params_of(unit)
