"""What only the CUDA kernels have, on a GPU (``cuda``) or in the CUDA emulation build (``emulated``,
``make cuda-emulate``, docs/emulation.md): the float32 matmul precision modes (3xTF32, TF32) and the
float16 / bfloat16 tensor-core products, determinism of the backward's float atomics, host reads and
CUDA-graph capture, launch limits and the grids and shared memory the launchers size, concurrent calls,
several devices, and the kernels' build. The results every backend shares (scores, gradients, mining,
the unit forms against the reference) are checked on every device by tests/test_scores.py,
test_autograd.py, test_mining.py, test_forms.py and test_numerics.py; the emulator's own tests are in
tests/test_emulation.py.

The ``device`` fixture here is ``cuda`` (a GPU and a CUDA build) or ``emulated`` (CPU tensors run the
emulated kernels, PDDM_EMU_ORDER selects the thread order); with neither (the CPU build) these tests
skip. Tests marked ``needs_gpu`` need a real GPU (sizes, several devices), ``needs_emulation`` the
emulation's hooks. Tolerances: scores and gradients as rel_err against the float64 reference (the fused
kernels sum in another order); mined indices within docs/design.md#ties-and-tolerance of the optimum.
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import ops, reference
from helpers import (EMULATED, GPU_BACKENDS, HALF, HALF_U, ODD_SHAPES, TOL, bank_case, check_bank_mining,
                     make_unit, needs_emulation, needs_gpu, params_of, reference_gradients, rel_err)

OPS = ("scores", "scores_backward", "mine_pddm", "mine_euclidean")


@pytest.fixture(params=GPU_BACKENDS)
def device(request):
    """The device of the tensors the CUDA kernels take here: "cuda", or "cpu" for the emulated kernels
    (overrides the device fixture of conftest.py, which adds the CPU kernels)."""
    return request.param


def test_cuda_kernels_registered_when_built_with_cuda():
    if not pddm_ext._C.with_cuda:
        pytest.skip("pddm_ext was built without CUDA")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", "CUDA"), op


# ---- the kernels' own arithmetic --------------------------------------------------------------------


def test_dense_products_are_not_computed_by_matmul(device):
    """P = x W_v^T, and the backward's dx += dP W_v and dW_v = dP_x^T x + dP_y^T y, run in the kernels'
    own arithmetic (gemm_kernel), not at::mm / cuBLAS, which computes float32 in TF32 under allow_tf32
    or matmul precision "high"."""
    unit = make_unit(12, 9, 7, device=device, dtype=torch.float32)
    x = torch.randn(13, 12, device=device)
    y = torch.randn(11, 12, device=device)
    lx = torch.randint(0, 3, (13,), device=device)
    ly = torch.randint(0, 3, (11,), device=device)
    p = params_of(unit)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.pddm_ext.scores(x, y, *p)
        torch.ops.pddm_ext.scores(x, None, *p)
        torch.ops.pddm_ext.mine_pddm(x, lx, y, ly, *p, 3)
        for other in (y, None):
            torch.ops.pddm_ext.scores_backward(torch.randn(13, 13 if other is None else 11, device=device),
                                               x, other, *p, [True, True, True])
    names = {e.name for e in prof.events()}
    assert "pddm_ext::scores_backward" in names
    assert not names & {"aten::mm", "aten::matmul", "aten::addmm", "aten::addmm_", "aten::bmm"}, sorted(names)


# ---- float32 precision: torch.get_float32_matmul_precision() (docs/design.md#precision) --------------

PRECISIONS = ("highest", "high", "medium")
# Largest relative error (rel_err) against the float64 reference of float32 scores, gradients and mined
# scores per precision: FP32 and 3xTF32 are float32-level; TF32 operands carry 2**-11 relative rounding.
PRECISION_TOL = {"highest": TOL[torch.float32], "high": TOL[torch.float32], "medium": 1e-2}


class matmul_precision:
    """with matmul_precision("medium"): ... sets torch's float32 matmul precision and restores it."""

    def __init__(self, precision):
        self.precision = precision

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous)


def precision_case(batch, device, m=19, n=13, d=24, h=40, c=20):
    """A unit and float32 inputs with duplicate rows (x[3] = x[2]; y[5] = y[4]) sized over several tiles,
    odd c and h > 32 (two output passes of the tensor-core block need h or c above 128: see the
    backward test)."""
    unit = make_unit(d, h, c, device=device, dtype=torch.float32)
    x = torch.randn(m, d)  # drawn on the CPU: the same data on every backend
    x[3] = x[2]
    y = None if batch else torch.randn(n, d)
    if y is not None:
        y[5] = y[4]
    return unit, x.to(device), None if y is None else y.to(device)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_scores_follow_the_float32_matmul_precision(batch, device):
    """highest: FP32 (the default; bitwise what no setting gives); high: 3xTF32, float32-level error
    (a few times FP32's: the tensor cores truncate), far below TF32's; medium: TF32, an error above
    FP32's (so the tensor-core path ran) within its bound. Duplicate rows
    score identically under every precision, and every precision is deterministic."""
    unit, x, y = precision_case(batch, device)
    p = params_of(unit)
    want = reference.pddm_scores(x.double(), None if y is None else y.double(), [q.double() for q in p])
    default = pddm_ext.pddm_scores(x, y, *p)
    errors = {}
    for precision in PRECISIONS:
        with matmul_precision(precision):
            got = pddm_ext.pddm_scores(x, y, *p)
            assert torch.equal(got, pddm_ext.pddm_scores(x, y, *p))
        errors[precision] = rel_err(got, want)
        assert errors[precision] < PRECISION_TOL[precision], (precision, errors)
        assert torch.equal(got[2], got[3])
        if batch:
            assert torch.equal(got, got.T)
        else:
            assert torch.equal(got[:, 4], got[:, 5])
        if precision == "highest":
            assert torch.equal(got, default)
    assert errors["medium"] > 10 * errors["highest"], errors  # the TF32 path ran
    assert errors["high"] < errors["medium"] / 20, errors  # the 3xTF32 cross terms are there


@pytest.mark.parametrize("precision,batch", [("high", True), ("medium", False)],
                         ids=["high-batch", "medium-reference"])  # one of each: the emulation is slow
@pytest.mark.parametrize("m,n,d,h,c", ODD_SHAPES)
def test_tensor_core_path_on_odd_sizes(m, n, d, h, c, batch, precision, device):
    """The tensor-core path on ODD_SHAPES (tests/helpers.py: d = h = c = 1, sizes that are not
    multiples of the 16 x 16 x 8 fragments nor of the 8 x 8 tiles, two output passes): scores within the
    precision's bound of the float64 reference, every gradient within TF32's."""
    unit = make_unit(d, h, c, device=device, dtype=torch.float32)
    x = torch.randn(m, d).to(device).requires_grad_()
    y = None if batch else torch.randn(n, d).to(device).requires_grad_()
    with matmul_precision(precision):
        S = unit(x) if batch else unit(x, y)
        G = torch.randn(S.shape).to(device)
        got = torch.autograd.grad((S * G).sum(), [x] + ([] if batch else [y]) + list(unit.parameters()))
    R, want = reference_gradients(x, y, unit, G)
    assert rel_err(S, R) < PRECISION_TOL[precision]
    # Gradients: TF32's bound under both precisions. A ReLU unit whose pre-activation lies within the
    # rounding error of 0 may switch and move a whole pair's contribution (seen under "high" in the
    # 65 x 130 reference case, not run here: pair (64, 100) switched joint unit 19, moving db_c by 8e-3
    # of its largest value, and dx / dy only in rows 64 / 100); a fault of the odd sizes (a lost
    # partial chunk or output pass) is far larger.
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * PRECISION_TOL["medium"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_gradients_follow_the_float32_matmul_precision(precision, batch, device):
    """Every gradient within the precision's bound of the float64 reference; c = 130 > 128 so that the
    tensor-core block makes two output passes. Each of the backward's tile products (W_c Z, dQ W_c,
    W_u^T dpre_u) uses the precision: under medium the gradients move off the FP32 ones."""
    unit, x, y = precision_case(batch, device, m=17, n=11, d=12, h=24, c=130)
    p = params_of(unit)
    G = torch.randn(17, 17 if batch else 11).to(device)

    def grads(x, y, params):
        x = x.detach().clone().requires_grad_()
        y = None if y is None else y.detach().clone().requires_grad_()
        params = [q.detach().clone().requires_grad_() for q in params]
        S = pddm_ext.pddm_scores(x, y, *params)
        return torch.autograd.grad((S * G).sum(), [x] + ([] if y is None else [y]) + params)

    _, want = reference_gradients(x, y, unit, G)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bitwise comparable runs (no float atomics)
    try:
        fp32 = grads(x, y, p)
        with matmul_precision(precision):
            got = grads(x, y, p)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * PRECISION_TOL[precision]
    changed = [not torch.equal(a, b) for a, b in zip(got, fp32)]
    assert any(changed) == (precision != "highest"), changed


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mining_follows_the_float32_matmul_precision(precision, device):
    """batch_hard under each precision picks, for every slot, a pair whose float64 reference
    score is within the precision's tolerance of the slot's reference optimum (docs/design.md
    #ties-and-tolerance, widened for TF32), and the mined scores are those of pddm_scores under the
    same precision (one arithmetic for scoring and mining)."""
    torch.manual_seed(3)
    unit = make_unit(24, 40, 20, device=device, dtype=torch.float32)
    x = torch.randn(40, 24, device=device)
    labels = torch.randint(0, 4, (40,), device=device)
    p = params_of(unit)
    R = reference.pddm_scores(x.double(), None, [q.double() for q in p])
    scale = 1 + R.abs().max().item()
    same = labels[:, None] == labels[None, :]
    with matmul_precision(precision):
        S = pddm_ext.pddm_scores(x, None, *p)
        a, pos, neg = pddm_ext.batch_hard(x, labels, unit)
    eye = torch.eye(40, dtype=torch.bool, device=device)
    assert a.numel() == 40
    tol = PRECISION_TOL[precision] * scale
    for i, j, k in zip(a.tolist(), pos.tolist(), neg.tolist()):
        positives, negatives = same[i] & ~eye[i], ~same[i]
        assert positives[j] and negatives[k]
        # the hardest positive is the lowest score, the hardest negative the highest
        assert R[i, j].item() <= R[i][positives].min().item() + tol
        assert R[i, k].item() >= R[i][negatives].max().item() - tol
        assert S[i, j].item() == S[i][positives].min().item()
        assert S[i, k].item() == S[i][negatives].max().item()


# ---- half inputs: float16 / bfloat16 tile products (docs/design.md#precision) ------------------------

# Scores of half inputs against the float64 reference of the same half values, relative to the largest
# (rel_err): each product rounds both operands by up to u (W_u, |x - y| and W_c, Z), the error of the
# joint layer's inputs passes through the ReLUs and normalisations at most doubled, and the score
# sums c such terms with signs: a few u at most in practice (measured, docs/design.md#precision:
# about 3u for float16 and 2u for bfloat16 in the worst of 3 seeds), 16 u here.
HALF_SCORE_TOL = {dtype: 16 * u for dtype, u in HALF_U.items()}


def half_tile_products(device):
    """Whether the backend runs the tile products of half inputs in their type: the emulation (a model of
    an sm_90 GPU) and GPUs of sm_80 or later; older GPUs compute them in FP32."""
    return EMULATED or torch.cuda.get_device_capability(device)[0] >= 8


def half_case(dtype, batch, device, m, n, d, seed=1):
    """Half inputs drawn on the CPU (the same on every backend), x[1] = x[0] where m > 2."""
    torch.manual_seed(seed)
    x = torch.randn(m, d).to(dtype)
    if m > 2:
        x[1] = x[0]
    y = None if batch else torch.randn(n, d).to(dtype)
    return x.to(device), None if y is None else y.to(device)


@pytest.mark.parametrize("dtype,batch", [(torch.float16, True), (torch.bfloat16, False)],
                         ids=["float16-batch", "bfloat16-reference"])  # one of each: the emulation is slow
@pytest.mark.parametrize("m,n,d,h,c", ODD_SHAPES)
def test_half_input_scores(m, n, d, h, c, batch, dtype, device):
    """Scores of half inputs on odd sizes (not multiples of the 16 x 16 x 16 fragments nor of the 8 x 8
    tiles; two output passes): float32 results within the half bound of the float64 reference of the half
    values, deterministic, batch mode exactly symmetric, duplicate rows scoring identically. Where the
    products run in the half type (sm_80+, the emulation) they differ from the upcast inputs' float32
    products (in the 64-wide unit); elsewhere they are those."""
    unit = make_unit(d, h, c, device=device, dtype=torch.float32)
    x, y = half_case(dtype, batch, device, m, n, d)
    p = params_of(unit)
    got = pddm_ext.pddm_scores(x, y, *p)
    want = reference.pddm_scores(x.double(), None if y is None else y.double(), [q.double() for q in p])
    fp32 = pddm_ext.pddm_scores(x.float(), None if y is None else y.float(), *p)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < HALF_SCORE_TOL[dtype]
    assert torch.equal(got, pddm_ext.pddm_scores(x, y, *p))
    if batch:
        assert torch.equal(got, got.T)
    if m > 2:
        assert torch.equal(got[0], got[1])
    if not half_tile_products(device):
        assert torch.equal(got, fp32)
    elif d >= 64:  # (small units may round to the same float32 scores by chance)
        assert not torch.equal(got, fp32)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_half_input_products_run_in_the_half_type(dtype, batch, device):
    """The error of half inputs' scores is the half type's: well above float32's (the half products ran,
    the float32 products of the upcast inputs did not), within HALF_SCORE_TOL, and bfloat16's above
    float16's (each its own rounding). Rows far beyond the unit scale (|x - y| beyond float16's range
    65504 before the per-pair scaling) score as accurately, in both forms of the unit."""
    if not half_tile_products(device):
        pytest.skip("this GPU computes half inputs in FP32 (before sm_80)")
    unit = make_unit(24, 40, 20, device=device, dtype=torch.float32)
    p = params_of(unit)
    errors = {}
    for form in (True, False):
        for scale in (1.0, 3e4):
            x, y = half_case(torch.float32, batch, device, 37, 29, 24, seed=2)
            big = lambda t: (t * scale).clamp(-6e4, 6e4).to(dtype)  # noqa: E731  (finite in float16)
            x, y = big(x), None if y is None else big(-y)
            want = reference.pddm_scores(x.double(), None if y is None else y.double(), [q.double() for q in p], form)
            got = pddm_ext.pddm_scores(x, y, *p, normalize_inputs=form)
            fp32 = pddm_ext.pddm_scores(x.float(), None if y is None else y.float(), *p, normalize_inputs=form)
            err, err32 = rel_err(got, want), rel_err(fp32, want)
            assert err < HALF_SCORE_TOL[dtype], (form, scale, err)
            assert err > 10 * err32, (form, scale, err, err32)
            errors[form, scale] = err
    assert max(errors.values()) > HALF_U[dtype] / 16, errors


# Gradients of half inputs against the float64 reference of the half values, relative to the largest
# of each gradient (rel_err). Where the backward's tile products run in the half type each rounds its
# operands by up to u, and a ReLU unit whose pre-activation lies within that error of 0 may switch
# and move a whole term of a gradient (the ReLU masks are the half forward's): measured in the
# emulation on test_half_input_gradients' case (17 x 11 rows, d = 12, h = 24, c = 130, seeds 0-2, both
# modes) at most 36 u for float16 (1.8e-2, dL/db_c) and 22 u for bfloat16 (8.7e-2, dL/db_c), so 64 u
# here (docs/design.md#precision has d = h = c = 128). Where they run in float32 (the CPU, GPUs before sm_80) the float32 tolerance
# plus one rounding of the embeddings' gradients to their dtype.
HALF_GRAD_TOL = {dtype: 64 * u for dtype, u in HALF_U.items()}


def half_gradients(unit, x, y, G):
    """The gradients of sum(S * G) in x (, y) and the unit's parameters, S = unit(x) or unit(x, y)."""
    x = x.detach().clone().requires_grad_()
    y = None if y is None else y.detach().clone().requires_grad_()
    S = unit(x) if y is None else unit(x, y)
    return torch.autograd.grad((S * G).sum(), [x] + ([] if y is None else [y]) + list(unit.parameters()))


def deterministically(f, *args):
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return f(*args)
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_half_input_gradients(dtype, batch, device):
    """Gradients of half inputs have their inputs' dtypes (the embeddings' half, the float32 parameters'
    float32) and lie within HALF_GRAD_TOL of the float64 reference. Where the tile products run in the
    half type (sm_80+, the emulation), the backward's run in it too: the gradients differ from the upcast
    inputs' float32 ones. Elsewhere (the CPU, GPUs before sm_80) they are bitwise the upcast inputs'
    (deterministic algorithms), and within the float32 tolerance plus one half rounding."""
    unit = make_unit(12, 24, 130, device=device, dtype=torch.float32)
    x, y = half_case(dtype, batch, device, 17, 11, 12)
    G = torch.randn(17, 17 if batch else 11).to(device)
    got = deterministically(half_gradients, unit, x, y, G)
    upcast = deterministically(half_gradients, unit, x.float(), None if y is None else y.float(), G)
    _, want = reference_gradients(x, y, unit, G)
    inputs = 1 if batch else 2
    half = half_tile_products(device)
    for i, (g, u, w) in enumerate(zip(got, upcast, want)):
        assert g.dtype == (dtype if i < inputs else torch.float32)
        if half:
            assert rel_err(g, w) < HALF_GRAD_TOL[dtype], (i, rel_err(g, w))
            if i < inputs or i in (inputs, inputs + 4):  # the embeddings', dW_u, dW_c
                assert not torch.equal(g, u.to(g.dtype)), i
        else:
            assert torch.equal(g, u.to(g.dtype))
            assert rel_err(g, w) < 10 * TOL[torch.float32] + (2 * HALF_U[dtype] if i < inputs else 0)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_half_backward_products_round_the_weights_to_the_half_type(dtype, batch, device):
    """Every tile product of half inputs, forward and backward, sees W_u and W_c only rounded to the half
    type: moving them by less than half a unit in its last place (so that they round to the same half
    values) leaves the scores and every gradient bitwise unchanged, while the float32 products of the
    upcast inputs see the change. Fails if any product of the backward (the recomputed forward's,
    dZ = dQ W_c or dU = dpre_u W_u) ran in float32."""
    if not half_tile_products(device):
        pytest.skip("this backend computes half inputs in FP32")
    unit = make_unit(20, 24, 40, device=device, dtype=torch.float32)
    with torch.no_grad():  # weights that are half values, and the same nudged within half an ulp
        for name in ("W_u", "W_c"):
            getattr(unit, name).copy_(getattr(unit, name).to(dtype).float())
    nudged = make_unit(20, 24, 40, device=device, dtype=torch.float32)
    nudged.load_state_dict(unit.state_dict())
    torch.manual_seed(3)
    with torch.no_grad():
        for name in ("W_u", "W_c"):
            W = getattr(nudged, name)
            W.mul_(1 + HALF_U[dtype] / 4 * torch.randn_like(W).sign())
            assert torch.equal(W.to(dtype).float(), getattr(unit, name)) and not torch.equal(W, getattr(unit, name))
    x, y = half_case(dtype, batch, device, 19, 13, 20)
    G = torch.randn(19, 19 if batch else 13).to(device)
    a = deterministically(half_gradients, unit, x, y, G)
    b = deterministically(half_gradients, nudged, x, y, G)
    for i, (ga, gb) in enumerate(zip(a, b)):
        assert torch.equal(ga, gb), i
    assert torch.equal(pddm_ext.pddm_scores(x, y, *params_of(unit)), pddm_ext.pddm_scores(x, y, *params_of(nudged)))
    x32, y32 = x.float(), None if y is None else y.float()
    a32 = deterministically(half_gradients, unit, x32, y32, G)
    b32 = deterministically(half_gradients, nudged, x32, y32, G)
    assert not torch.equal(a32[0], b32[0])


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_backward_recomputes_the_forward_half_products(dtype, device):
    """The backward of half inputs differentiates the function the forward computed: its recomputed
    joint layer q = relu(W_c z + b_c) of a pair is the forward's (the same half products), so with
    dS one-hot at the pair, dL/dw_s = q and w_s . q + b_s gives back the forward's score of the pair to
    float32 rounding, while the upcast inputs' float32 score differs from it by the half rounding."""
    if not half_tile_products(device):
        pytest.skip("this backend computes half inputs in FP32")
    unit = make_unit(64, 64, 64, device=device, dtype=torch.float32)
    p = params_of(unit)
    x, y = half_case(dtype, False, device, 9, 10, 64, seed=6)
    S = pddm_ext.pddm_scores(x, y, *p)
    S32 = pddm_ext.pddm_scores(x.float(), y.float(), *p)
    i, r = divmod(int((S - S32).abs().argmax()), 10)
    G = torch.zeros(9, 10, device=device)
    G[i, r] = 1
    grads = torch.ops.pddm_ext.scores_backward(G, x.float(), y.float(), *p, [False, False, True], True, dtype)
    q = grads[8]  # dL/dw_s
    assert (q >= 0).all()
    rebuilt = ((p[6].double() * q.double()).sum() + p[7].double()).item()
    off = abs(rebuilt - S[i, r].item())
    assert off < 1e-5 * (1 + S.abs().max().item())
    assert abs(S32[i, r].item() - S[i, r].item()) > 20 * off


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_half_backward_scales_small_gradients(batch, device):
    """The backward's gradient products of float16 inputs scale each pair's operand by a power of two
    (undone, exactly, in float32): a dS of 2^-40 times G, whose dQ = dS w_s and dpre_u lie far below
    float16's smallest subnormal (6e-8), gives exactly 2^-40 times G's gradients (every step of the
    backward is linear in dS), where an unscaled float16 operand would round to 0. The op is called on
    the float32 tensors of the half values, so that the embeddings' gradients are float32 too."""
    unit = make_unit(20, 24, 40, device=device, dtype=torch.float32)
    x, y = half_case(torch.float16, batch, device, 19, 13, 20)
    x, y = x.float(), None if y is None else y.float()
    G = torch.randn(19, 19 if batch else 13).to(device)

    def grads(G):
        return torch.ops.pddm_ext.scores_backward(G, x, y, *params_of(unit), [True, True, True], True, torch.float16)

    a = deterministically(grads, G)
    b = deterministically(grads, G * 2.0**-40)
    for i, (ga, gb) in enumerate(zip(a, b)):
        if ga.numel():  # (batch mode: no y)
            assert ga.abs().max() > 0 and torch.equal(ga * 2.0**-40, gb), i


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_half_input_mining(dtype, batch, device):
    """batch_hard and mine_hard on half inputs: every slot picks a pair whose float64 reference score is
    within the half bound of the slot's reference optimum (the half products decide only near-ties), and
    the mined scores are exactly those pddm_scores gives the same half inputs (one arithmetic)."""
    unit = make_unit(24, 40, 20, device=device, dtype=torch.float32)
    x, y = half_case(dtype, batch, device, 41, 35, 24, seed=4)
    torch.manual_seed(5)
    lx = torch.randint(0, 4, (41,)).to(device)
    ly = None if batch else torch.randint(0, 4, (35,)).to(device)
    p = params_of(unit)
    R = reference.pddm_scores(x.double(), None if y is None else y.double(), [q.double() for q in p])
    S = pddm_ext.pddm_scores(x, y, *p)
    tol = HALF_SCORE_TOL[dtype] * (1 + R.abs().max().item())
    same = lx[:, None] == (lx if batch else ly)[None, :]
    if batch:
        same &= ~torch.eye(41, dtype=torch.bool, device=device)
    negative = lx[:, None] != (lx if batch else ly)[None, :]
    a, pos, neg = pddm_ext.batch_hard(x, lx, unit, ref_emb=y, ref_labels=ly)
    assert a.numel() > 30
    for i, j, k in zip(a.tolist(), pos.tolist(), neg.tolist()):
        assert same[i, j] and negative[i, k]
        assert R[i, j].item() <= R[i][same[i]].min().item() + tol
        assert R[i, k].item() >= R[i][negative[i]].max().item() - tol
        assert S[i, j].item() == S[i][same[i]].min().item()
        assert S[i, k].item() == S[i][negative[i]].max().item()
    quads = pddm_ext.mine_hard(x, lx, unit, k=5, ref_emb=y, ref_labels=ly)
    assert quads.anchor.numel() == 5
    i, r = quads.anchor, quads.positive
    assert torch.equal(quads.scores[:, 0], S[i, r])
    assert torch.equal(quads.scores[:, 1], S[i, quads.anchor_negative])
    assert torch.equal(quads.scores[:, 2], S[quads.positive_negative, r])
    positives = S[same.triu() if batch else same]  # batch mode: unordered pairs i < r
    assert torch.equal(quads.scores[:, 0], positives.sort().values[:5])


def test_half_product_dtype_errors(device):
    """The ops' product_dtype (scores, its backward, mining) takes only float16 / bfloat16 and only for
    float32 tensors (TypeError naming it); float16 inputs with a parameter beyond float16's range raise ValueError naming it."""
    unit = make_unit(6, 5, 4, device=device, dtype=torch.float32)
    p = params_of(unit)
    x = torch.randn(9, 6, device=device)
    lx = torch.randint(0, 3, (9,), device=device)
    for bad in (torch.float64, torch.float32, torch.int32):
        with pytest.raises(TypeError, match="product_dtype must be None, float16 or bfloat16, got"):
            torch.ops.pddm_ext.scores(x, None, *p, True, bad)
        with pytest.raises(TypeError, match="product_dtype"):
            torch.ops.pddm_ext.mine_pddm(x, lx, None, None, *p, 1, True, bad)
        with pytest.raises(TypeError, match="scores_backward: product_dtype must be None, float16 or bfloat16"):
            torch.ops.pddm_ext.scores_backward(torch.ones(9, 9, device=device), x, None, *p, [True, False, True],
                                               True, bad)
    with pytest.raises(TypeError, match="applies to float32 tensors.*Double"):
        torch.ops.pddm_ext.scores(x.double(), None, *(q.double() for q in p), True, torch.float16)
    with pytest.raises(TypeError, match="scores_backward: product_dtype .*applies to float32 tensors.*Double"):
        torch.ops.pddm_ext.scores_backward(torch.ones(9, 9, device=device, dtype=torch.float64), x.double(), None,
                                           *(q.double() for q in p), [True, False, True], True, torch.float16)
    with torch.no_grad():
        unit.W_c[0, 0] = 7e4
    big = params_of(unit)
    with pytest.raises(ValueError, match="W_c has entries beyond float16's range"):
        pddm_ext.pddm_scores(x.half(), None, *big)
    with pytest.raises(ValueError, match="W_c has entries beyond float16's range"):
        pddm_ext.batch_hard(x.half(), lx, unit)
    # bfloat16 has float32's range; float32 inputs never round the parameters
    pddm_ext.pddm_scores(x.bfloat16(), None, *big)
    pddm_ext.pddm_scores(x, None, *big)


def deterministic_backward(*args, runs):
    """scores_backward(*args) `runs` times under torch.use_deterministic_algorithms(True); asserts the
    results bitwise equal and returns the first."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: report, do not raise, elsewhere
    try:
        results = [torch.ops.pddm_ext.scores_backward(*args) for _ in range(runs)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    return results[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_backward_skips_zero_gradient_pairs(batch, sparse, dtype, device):
    """Pairs with a zero gradient contribute nothing, as on the CPU path: the pair of a row of x at
    +0.9 max and a row at -0.9 max (of the dtype), whose difference overflows (its activations are
    NaN), has a zero gradient, as has every other pair of those rows, and every gradient is still the
    reference's, the rows' own 0. A sparse dS (here ~10% of the pairs: they fill at most a quarter of
    the tiles that hold any) is walked as a list of its live pairs (several list tiles, the last one
    partial), a dense one by tiles: the device chooses (the emulation logs its choice), the list is
    built by one aten::nonzero_static either way."""
    unit = make_unit(9, 7, 5, dtype=dtype, device=device, seed=3)
    m, n, dead, dead_col = 43, 37, 10, 17
    torch.manual_seed(5)
    x = torch.randn(m, 9, device=device, dtype=dtype)
    y = None if batch else torch.randn(n, 9, device=device, dtype=dtype)
    grad = torch.randn(m, m if batch else n, device=device, dtype=dtype)
    if sparse:
        grad *= torch.rand(grad.shape, device=device) < 0.1
    grad[dead] = 0  # every pair of x_dead and of the column dead_col has a zero gradient ...
    grad[:, dead_col] = 0
    if batch:
        grad[:, dead] = 0
        grad[dead_col] = 0
    x_finite, y_finite = x.clone(), None if batch else y.clone()
    big = 0.9 * torch.finfo(dtype).max
    x[dead] = big  # ... so the NaN activations of their pair (dead, dead_col) never reach a gradient
    (x if batch else y)[dead_col] = -big
    p = params_of(unit)
    if EMULATED:
        torch.ops.pddm_emu_test.launch_log("")  # clears the log
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.ops.pddm_ext.scores_backward(grad, x, y, *p, [True, True, True])
    assert "aten::nonzero_static" in {e.name for e in prof.events()}
    if EMULATED:  # the number of listed pairs, or -1 for the dense tiles
        (listed,) = torch.ops.pddm_emu_test.launch_log("listed pairs")
        assert (listed >= 0) == sparse
    xd = x_finite.double().requires_grad_()
    yd = None if batch else y_finite.double().requires_grad_()
    pd = [t.double().requires_grad_() for t in p]
    want = torch.autograd.grad((reference.pddm_scores(xd, yd, pd) * grad.double()).sum(),
                               [xd] + ([] if batch else [yd]) + pd)
    got_list = [got[0]] + ([] if batch else [got[1]]) + list(got[2:])
    assert torch.all(got[0][dead] == 0) and torch.all((got[0] if batch else got[1])[dead_col] == 0)
    for g, w in zip(got_list, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, w) < (1e-9 if dtype == torch.float64 else 10 * TOL[dtype])
    deterministic_backward(grad, x, y, *p, [True, True, True], runs=3)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_backward_is_reproducible_under_deterministic_algorithms(batch, device):
    """With torch.use_deterministic_algorithms(True) the backward's input gradients are summed in a
    fixed order: bitwise equal run to run. (The emulation shows the difference under the random
    order, which shuffles the blocks of every launch: float atomics from several blocks then add
    in another order each run.)"""
    unit = make_unit(11, 10, 6, device=device, seed=2, dtype=torch.float32)
    m, n = 45, 38
    x = torch.randn(m, 11, device=device)
    y = None if batch else torch.randn(n, 11, device=device)
    grad = torch.randn(m, m if batch else n, device=device)
    p = params_of(unit)
    result = deterministic_backward(grad, x, y, *p, [True, True, True], runs=4)
    xd = x.double().requires_grad_()
    yd = None if batch else y.double().requires_grad_()
    pd = [t.double().requires_grad_() for t in p]
    R = reference.pddm_scores(xd, yd, pd)
    want = torch.autograd.grad((R * grad.double()).sum(), [xd] + ([] if batch else [yd]) + pd)
    got = [result[0]] + ([] if batch else [result[1]]) + list(result[2:])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL[torch.float32]


HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}  # a device-to-host read of data
# torch before 2.6 has no nonzero_static for CUDA tensors: there the backward reads one count (docs/design.md).
CUDA_NONZERO_STATIC = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


def backward_cases(device):
    """(grad, x, y, params) of a batch and a reference backward, each with a dense and a sparse dS."""
    unit = make_unit(9, 7, 5, device=device, seed=4, dtype=torch.float32)
    torch.manual_seed(6)
    x = torch.randn(30, 9, device=device)
    for y in (None, torch.randn(21, 9, device=device)):
        grad = torch.randn(30, 30 if y is None else 21, device=device)
        for sparse in (False, True):
            yield (grad * (torch.rand(grad.shape, device=device) < 0.05) if sparse else grad), x, y, params_of(unit)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_backward_reads_nothing_back_to_the_host(deterministic, device):
    """The backward (dense or sparse dS, batch or reference mode, atomics or deterministic) chooses its
    walk on the device: no aten::item / _local_scalar_dense / nonzero (whose output size needs a host
    read) among the ops it runs, so it neither stalls the host nor breaks CUDA-graph capture."""
    if device == "cuda" and not CUDA_NONZERO_STATIC:
        pytest.skip("torch before 2.6: the CUDA backward reads the live-pair count (no nonzero_static)")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        for grad, x, y, p in backward_cases(device):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.ops.pddm_ext.scores_backward(grad, x, y, *p, [True, True, True])
            names = {e.name for e in prof.events()}
            assert "pddm_ext::scores_backward" in names
            assert not names & HOST_READS, names & HOST_READS
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_mining_reads_back_only_its_counts(batch, device):
    """Mining reads back what its variable-length pair list needs: the positive-pair count (one
    aten::item, from the labels without grouping them: no unique_consecutive) and after the kernel
    the number of candidates kept (one item or nonzero); with k = 0 (no pair list) nothing."""
    unit = make_unit(9, 7, 5, device=device, seed=1, dtype=torch.float32)
    torch.manual_seed(2)
    x = torch.randn(40, 9, device=device)
    lx = torch.randint(0, 4, (40,), device=device)
    y = None if batch else torch.randn(33, 9, device=device)
    ly = None if batch else torch.randint(0, 4, (33,), device=device)
    for k in (0, 3, 10000):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = torch.ops.pddm_ext.mine_pddm(x, lx, y, ly, *params_of(unit), k)
        events = prof.events()
        assert "aten::unique_consecutive" not in {e.name for e in events}
        reads = [e.name for e in events if e.name in {"aten::item", "aten::nonzero", "aten::masked_select"}
                 and e.cpu_parent is not None and e.cpu_parent.name == "pddm_ext::mine_pddm"]
        assert len(reads) == (0 if k == 0 else 2), reads
        if k == 10000:  # every positive pair: the count from the labels is exact in batch mode
            lyy = lx if batch else ly
            same = (lx[:, None] == lyy[None, :]).sum().item()
            assert out[6].numel() == ((same - 40) // 2 if batch else same)


@needs_gpu
@pytest.mark.skipif(not CUDA_NONZERO_STATIC, reason="torch before 2.6: the backward reads one count (no nonzero_static)")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_backward_captures_in_a_cuda_graph(deterministic):
    """On a GPU the backward runs with torch.cuda.set_sync_debug_mode("error") (a synchronising call
    raises) and captures in a CUDA graph, whose replay gives the eager result (bitwise when
    deterministic, within the tolerance otherwise)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        for grad, x, y, p in backward_cases("cuda"):
            args = (grad, x, y, *p, [True, True, True])
            eager = torch.ops.pddm_ext.scores_backward(*args)  # also warms up (allocator, attributes)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                torch.ops.pddm_ext.scores_backward(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.ops.pddm_ext.scores_backward(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = torch.ops.pddm_ext.scores_backward(*args)
            graph.replay()
            torch.cuda.synchronize()
            for a, b in zip(eager, captured):
                if deterministic:
                    assert torch.equal(a, b)
                elif a.numel():
                    assert rel_err(b, a) < TOL[torch.float32]
    finally:
        torch.use_deterministic_algorithms(previous)


def test_concurrent_calls_with_different_hidden_sizes(device):
    """Two host threads with different h on one device: the dynamic shared memory limit is set once
    per device and kernel to the plan's maximum, so neither lowers it under the other's launch."""
    import threading

    units = [make_unit(8, h, 4, device=device, seed=h, dtype=torch.float32) for h in (12, 150)]
    x = torch.randn(20, 8, device=device)
    want = [reference.pddm_scores(x.double(), None, [p.double() for p in params_of(u)]) for u in units]
    errors = []

    def work(k):
        try:
            for _ in range(3):
                got = torch.ops.pddm_ext.scores(x, None, *params_of(units[k]))
                assert rel_err(got, want[k]) < TOL[torch.float32]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---- mining ----------------------------------------------------------------------------------------


@needs_gpu
def test_mining_with_more_than_2_pow_31_pairs():
    """64 queries against a 34M-row bank: pair numbers and i * n + r exceed 2^31 (about 1.2 GB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 4 << 30:
        pytest.skip("needs about 4 GB of free GPU memory")
    m, n, d = 64, 34_000_000, 4
    assert m * n > 2**31
    check_bank_mining(*bank_case(m, n, d, "cuda"), 3, 1 << 22)


@needs_gpu
def test_second_device_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("only one CUDA device")
    unit0 = make_unit(12, 10, 8, dtype=torch.float32, device="cuda")
    unit1 = make_unit(12, 10, 8, device="cuda:1", dtype=torch.float32)
    x = torch.randn(30, 12, device="cuda:0")
    labels = torch.randint(0, 4, (30,), device="cuda:0")
    S0 = pddm_ext.pddm_scores(x, None, *params_of(unit0))
    with torch.cuda.device(0):  # the op must follow its inputs' device, not the current one
        S1 = pddm_ext.pddm_scores(x.to("cuda:1"), None, *params_of(unit1))
        out = ops.mine(x.to("cuda:1"), labels.to("cuda:1"), None, None, params_of(unit1), 2)
    assert S1.device == torch.device("cuda:1") and out[0].device == torch.device("cuda:1")
    assert rel_err(S1.cpu(), S0.cpu()) < 1e-5


# ---- bad input (docs/design.md#errors) --------------------------------------------------------------


@needs_gpu
def test_device_mismatch_errors():
    unit = make_unit(8, dtype=torch.float32, device="cuda")
    x = torch.randn(5, 8, device="cuda")
    with pytest.raises(ValueError, match="device"):
        pddm_ext.pddm_scores(x, torch.randn(4, 8), *params_of(unit))
    with pytest.raises(ValueError, match="device"):
        pddm_ext.pddm_scores(x.cpu(), None, *params_of(unit))
    with pytest.raises(ValueError, match="device"):
        pddm_ext.mine_hard(x, torch.arange(5, device="cuda"), unit, ref_emb=torch.randn(4, 8),
                           ref_labels=torch.arange(4))


# ---- grids and shared memory the launchers size, builds for older GPUs (the emulation's hooks) -------


@needs_emulation
def test_backward_sizing_keeps_a_block_per_sm():
    """The backward's grid (backward_sizing.h) for shapes too large to run in the emulation, on a
    132-SM GPU holding one block per SM: deterministic batch mode at m = 16384, d = h = c = 128 (the
    per-block slices alone would allow 15), a 1M-row bank with a trained y (it would allow 1: the bank
    is walked in column chunks, the slices of all blocks within the 256 MB budget), a
    d = h = c = 1024 unit's parameter slabs (16 within the budget). At least a block per SM, and
    the grid depends on the shapes and the SM count only."""
    sizing = torch.ops.pddm_emu_test.backward_sizing
    MB = 1 << 20
    for deterministic in (False, True):
        blocks, chunk, _ = sizing(True, 16384, 16384, 128, 128, 128, True, True, True, deterministic, 4, 132, 132)
        assert blocks == 132 and chunk == 16384
    blocks, _, memory = sizing(True, 16384, 16384, 128, 128, 128, True, True, True, True, 4, 132, 264)
    assert blocks >= 132 and memory == blocks * (16384 * 256 * 4 + (2 * 128 * 128 * 2 + 4 * 128 + 1) * 4)  # 2.3 GB
    blocks, chunk, memory = sizing(False, 256, 1 << 20, 128, 128, 128, True, True, True, True, 4, 132, 132)
    slab = (2 * 128 * 128 * 2 + 4 * 128 + 1) * 4
    assert blocks == 132 and 0 < chunk < (1 << 20) and chunk % 8 == 0 and memory <= 256 * MB + 132 * slab
    blocks, chunk, _ = sizing(False, 256, 1 << 20, 128, 128, 128, True, True, True, False, 4, 132, 132)
    assert blocks == 132 and chunk == 1 << 20  # atomics: no slices, one launch
    blocks, _, memory = sizing(True, 4096, 4096, 1024, 1024, 1024, True, True, True, False, 4, 132, 132)
    assert blocks == 132 and memory == 132 * (2 * 1024 * 1024 * 2 + 4 * 1024 + 1) * 4
    assert sizing(True, 4096, 4096, 1024, 1024, 1024, True, True, True, False, 4, 8, 8)[0] == 8
    # A tiny problem keeps one block per tile; a small unit stays within the budget with more blocks.
    assert sizing(False, 5, 7, 4, 4, 4, True, True, True, True, 8, 132, 1056)[0] == 1
    assert sizing(True, 16384, 16384, 16, 16, 16, True, True, True, False, 4, 132, 1056)[0] == 1056


@needs_emulation
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_deterministic_backward_keeps_a_block_per_emulated_sm(batch, monkeypatch):
    """On an emulated 6-SM GPU with a per-block buffer budget too small for one block's slices, the
    deterministic backward still launches one block per SM (the grids in the emulation's launch log);
    in reference mode it walks y in chunks of 8 columns (one launch each). Bitwise equal run to run,
    and within the tolerance of the reference and of the single-launch result under the default
    budget; the atomic path's parameter slabs keep one block per SM too."""
    unit = make_unit(11, 10, 6, device="cpu", seed=2, dtype=torch.float32)
    m, n = 45, 38
    torch.manual_seed(8)
    x = torch.randn(m, 11)
    y = None if batch else torch.randn(n, 11)
    grad = torch.randn(m, m if batch else n)
    args = (grad, x, y, *params_of(unit), [True, True, True])
    monkeypatch.setenv("PDDM_EMU_SM_COUNT", "6")
    whole = deterministic_backward(*args, runs=1)
    torch.ops.pddm_emu_test.launch_log("")
    monkeypatch.setenv("PDDM_EMU_BACKWARD_BUDGET", "4096")
    chunked = deterministic_backward(*args, runs=3)
    grids = torch.ops.pddm_emu_test.launch_log("scores_backward_tile_kernel")
    assert grids == [6] * (3 if batch else 3 * 5), grids  # 3 runs; reference: 5 chunks of 8 columns
    for a, b in zip(chunked, whole):
        if a.numel():
            assert rel_err(a, b) < TOL[torch.float32]
    xd = x.double().requires_grad_()
    yd = None if batch else y.double().requires_grad_()
    pd = [t.double().requires_grad_() for t in params_of(unit)]
    want = torch.autograd.grad((reference.pddm_scores(xd, yd, pd) * grad.double()).sum(), [xd] + ([] if batch else [yd]) + pd)
    got = [chunked[0]] + ([] if batch else [chunked[1]]) + list(chunked[2:])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL[torch.float32]
    torch.ops.pddm_ext.scores_backward(*args)  # atomics: the parameter slabs alone
    assert torch.ops.pddm_emu_test.launch_log("scores_backward_tile_kernel") == [6]


@needs_emulation
def test_pair_gemm_staging_is_double_buffered_where_shared_memory_allows():
    """The forward launchers give pair_gemm a second staging buffer (the next reduction chunk copied while the
    current one is multiplied) where it fits next to the tile workspace without fewer resident blocks per SM,
    which the emulated H200 counts by shared memory alone: at h = 130 the forward takes it (float32 products and
    the float16 / bfloat16 tensor-core products alike), at h = 1 it would drop from 7 to 5 blocks per SM. The
    backward kernel is compiled with one buffer and never takes a second, even where it would fit (d = h = c = 8).
    The dynamic shared memory of the launch shows which: staging buffers plus the workspace (float32)."""
    staging = (16 * (64 + 4) + 16 * (128 + 4)) * 4  # smem_layout.h: operand and weight chunks, padded rows

    def ws(n):
        return (n + 31) // 32 * 32 + 8  # a workspace row (layout::workspace_stride)

    smem = torch.ops.pddm_emu_test.last_launch_smem
    for h, stages in ((130, 2), (1, 1)):
        unit = make_unit(8, h, 4, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            unit(torch.randn(9, 8))
        assert smem("scores_tile_kernel") == stages * staging + 64 * ws(2 * h) * 4, h
    x = torch.randn(9, 8)
    p = params_of(make_unit(8, 130, 4, device="cpu", dtype=torch.float32))
    for dtype in HALF:
        torch.ops.pddm_ext.scores(x, None, *p, True, dtype)
        assert smem("scores_tile_kernel") == 2 * staging + 64 * ws(260) * 4, dtype
    for d, h, c in ((128, 128, 128), (8, 8, 8)):
        unit = make_unit(d, h, c, device="cpu", dtype=torch.float32)
        unit(torch.randn(9, d, requires_grad=True)).sum().backward()
        assert smem("scores_backward_tile_kernel") == staging + 64 * (2 * ws(2 * h) + ws(c) + ws(d)) * 4, d


def test_precision_set_with_the_newer_fp32_precision_api(device, tmp_path):
    """allow_tf32 = True is "high"; torch.backends.cuda.matmul.fp32_precision = "tf32" (torch's newer API,
    after which its legacy getter refuses to answer) gives one TF32 pass, "ieee" FP32 even after "high".
    In a subprocess: the newer API's setting cannot be undone for the rest of a process."""
    import subprocess
    import sys

    script = f"""
import torch, pddm_ext
from pddm_ext import reference
torch.manual_seed(0)
unit = pddm_ext.PDDM(24, 40, 20).to({device!r})
p = [getattr(unit, n).detach() for n in reference.PARAM_NAMES]
x = torch.randn(19, 24, device={device!r})
want = pddm_ext.pddm_scores(x, None, *p)
torch.set_float32_matmul_precision("medium")
tf32 = pddm_ext.pddm_scores(x, None, *p)
torch.set_float32_matmul_precision("high")
tf32x3 = pddm_ext.pddm_scores(x, None, *p)
torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = True  # torch's other spelling of "high"
assert torch.equal(pddm_ext.pddm_scores(x, None, *p), tf32x3)
torch.backends.cuda.matmul.allow_tf32 = False
assert torch.equal(pddm_ext.pddm_scores(x, None, *p), want)
try:
    torch.backends.cuda.matmul.fp32_precision
except AttributeError:
    print("no-api")
    raise SystemExit(0)
torch.backends.cuda.matmul.fp32_precision = "tf32"
try:
    got = pddm_ext.pddm_scores(x, None, *p)
except RuntimeError as e:
    print("refused:", e)
    raise SystemExit(0)
assert torch.equal(got, tf32)
torch.backends.cuda.matmul.fp32_precision = "ieee"
assert torch.equal(pddm_ext.pddm_scores(x, None, *p), want)
torch.set_float32_matmul_precision("high")
torch.backends.cuda.matmul.fp32_precision = "ieee"  # the latest setting wins
assert torch.equal(pddm_ext.pddm_scores(x, None, *p), want)
assert not torch.equal(tf32, want) and not torch.equal(tf32, tf32x3)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if "no-api" in out.stdout:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cuda.matmul.fp32_precision")
    if "refused:" in out.stdout:  # a torch whose C++ getter of that API the kernels do not know
        assert tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13), out.stdout
        assert "set it with torch.set_float32_matmul_precision()" in out.stdout
    else:
        assert out.stdout.strip().endswith("ok"), out.stdout


@needs_emulation
def test_tensor_cores_refused_for_kernels_compiled_without_them(tmp_path):
    """Kernels compiled for an architecture before compute_80 (PDDM_EMU_PTX_VERSION=70: a build for
    sm_70 JIT-compiled for a newer GPU) have no tensor-core path: "high" / "medium" raise a clear error
    instead of computing FP32; "highest" runs."""
    import os
    import subprocess
    import sys

    script = """
import torch, pddm_ext
from pddm_ext import reference
unit = pddm_ext.PDDM(8, 6, 5)
x = torch.randn(9, 8)
pddm_ext.pddm_scores(x, None, *[getattr(unit, n).detach() for n in reference.PARAM_NAMES])
torch.set_float32_matmul_precision("medium")
try:
    unit(x)
except RuntimeError as e:
    print("refused:", e)
"""
    env = dict(os.environ, PDDM_EMU_PTX_VERSION="70")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused:" in out.stdout and "compiled for compute_70" in out.stdout, out.stdout


@needs_emulation
def test_half_tensor_cores_refused_for_kernels_compiled_without_them():
    """Kernels compiled before compute_80 (PDDM_EMU_PTX_VERSION=75: a build for sm_75 JIT-compiled for a
    newer GPU) have no half tensor-core path: float16 / bfloat16 inputs raise, naming the dtype and the two
    fixes, instead of computing FP32; their upcast values run."""
    import os
    import subprocess
    import sys

    script = """
import torch, pddm_ext
unit = pddm_ext.PDDM(8, 6, 5)
x = torch.randn(9, 8)
unit(x)
for dtype in (torch.float16, torch.bfloat16):
    try:
        unit(x.to(dtype))
    except RuntimeError as e:
        print("refused:", e)
    try:
        pddm_ext.batch_hard(x.to(dtype), torch.arange(9) % 3, unit)
    except RuntimeError as e:
        print("refused:", e)
"""
    env = dict(os.environ, PDDM_EMU_PTX_VERSION="75")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
    assert len(lines) == 4, out.stdout
    for line, dtype in zip(lines, ["float16", "float16", "bfloat16", "bfloat16"]):
        assert f"{dtype} inputs run their tile products on tensor cores" in line, line
        assert "compiled for compute_75" in line and "upcast the inputs to float32" in line, line
