"""The fused backward of pddm_scores / unit(x) / unit(x, y), and opcheck on every op."""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from pddm_ext.reference import PARAM_NAMES
from helpers import ODD_SHAPES, TOL, cpu_kernels_only, make_unit, params_of, randn, reference_gradients, rel_err

ops = torch.ops.pddm_ext


def leaves(unit, dtype=torch.float64):
    """Fresh leaf copies of the unit's parameters (requires_grad=True)."""
    return [p.detach().to(dtype).clone().requires_grad_() for p in unit.params()]


# --------------------------------------------------------------------------- gradcheck (float64)

# (m, n, d, h, c): odd sizes, each one tile; n=None is batch mode. test_gradcheck_across_tiles crosses
# tile edges.
GRADCHECK_SHAPES = [
    (1, None, 3, 2, 2),
    (2, None, 1, 3, 2),
    (5, None, 3, 4, 3),
    (7, None, 5, 3, 6),
    (1, 4, 3, 3, 2),
    (4, 1, 2, 5, 3),
    (5, 7, 3, 4, 3),
    (3, 6, 1, 2, 5),
]


@pytest.mark.parametrize("m,n,d,h,c", GRADCHECK_SHAPES, ids=[f"m{s[0]}n{s[1]}d{s[2]}h{s[3]}c{s[4]}" for s in GRADCHECK_SHAPES])
def test_gradcheck_x_y_and_every_parameter(m, n, d, h, c, device):
    unit = make_unit(d, h, c, seed=m + 10 * d, device=device)
    x = randn(m, d, seed=1, device=device).requires_grad_()
    params = leaves(unit)
    if n is None:
        fn = lambda x, *p: pddm_ext.pddm_scores(x, None, *p)  # noqa: E731
        inputs = (x, *params)
    else:
        y = randn(n, d, seed=2, device=device).requires_grad_()
        fn = lambda x, y, *p: pddm_ext.pddm_scores(x, y, *p)  # noqa: E731
        inputs = (x, y, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
@pytest.mark.multithreaded
def test_gradcheck_across_tiles(batch, device):
    """m = 35 rows: two tile rows/columns of the 32-pair tile side used at these widths (fast mode:
    random projections of the Jacobian, since the full one has 35^2 rows)."""
    unit = make_unit(3, 4, 3, seed=3, device=device)
    x = randn(35, 3, seed=4, device=device).requires_grad_()
    params = leaves(unit)
    if batch:
        fn = lambda x, *p: pddm_ext.pddm_scores(x, None, *p)  # noqa: E731
        inputs = (x, *params)
    else:
        y = randn(34, 3, seed=5, device=device).requires_grad_()
        fn = lambda x, y, *p: pddm_ext.pddm_scores(x, y, *p)  # noqa: E731
        inputs = (x, y, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_through_module(device):
    unit = make_unit(4, 3, 5, device=device)
    x = randn(6, 4, seed=1, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: unit(x), (x,))
    y = randn(3, 4, seed=2, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: unit(x, y), (x, y))


def test_gradient_with_duplicate_rows_in_batch_mode(device):
    """Duplicate rows meet at u = 0 (normalize(0) = 0, the abs kink); the fused backward must agree with
    the reference's autograd there (the diagonal too: S(a, a) depends on a only through v)."""
    unit = make_unit(4, 5, 3, seed=7, device=device)
    z = randn(4, 4, seed=8, device=device)
    x0 = torch.cat([z, z[:2]])
    g = randn(6, 6, seed=9, device=device)
    x, params = x0.clone().requires_grad_(), leaves(unit)
    (pddm_ext.pddm_scores(x, None, *params) * g).sum().backward()
    xr, params_r = x0.clone().requires_grad_(), leaves(unit)
    (reference.pddm_scores(xr, None, params_r) * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    for name, p, pr in zip(PARAM_NAMES, params, params_r):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-10, msg=name)


def _sparse_upstream(pattern, m, n):
    g = randn(m, n, seed=11)
    if pattern == "random90":  # a margin loss: most pairs contribute nothing
        g = g * (randn(m, n, seed=12) > 1.3)
    elif pattern == "blocks":  # whole tiles of zeros (the tile side is 32 at these widths)
        g[:40] = 0
        g[:, 33:] = 0
    elif pattern == "single":
        g = torch.zeros(m, n, dtype=g.dtype)
        g[m - 1, n // 2] = 0.75
    elif pattern == "zero":
        g = torch.zeros(m, n, dtype=g.dtype)
    elif pattern == "antisymmetric":  # batch mode sums dS[i, r] + dS[r, i] = 0: no pair contributes
        g = g - g.T
    return g


SPARSE_CASES = [(batch, p) for batch in (True, False) for p in ("random90", "blocks", "single", "zero")]
SPARSE_CASES.append((True, "antisymmetric"))  # needs a square dS


@pytest.mark.parametrize("batch,pattern", SPARSE_CASES, ids=[("batch-" if b else "ref-") + p for b, p in SPARSE_CASES])
@pytest.mark.multithreaded
def test_sparse_upstream_gradient_matches_reference(batch, pattern, device):
    """The backward skips pairs (and whole tiles) whose upstream gradient is zero; what it returns must
    not change: every gradient equals the reference's autograd, exact zeros included."""
    unit = make_unit(6, 5, 4, seed=13, device=device)
    m, n = 70, (70 if batch else 45)
    x0, y0 = randn(m, 6, seed=14, device=device), None if batch else randn(n, 6, seed=15, device=device)
    g = _sparse_upstream(pattern, m, n).to(device)

    x, params = x0.clone().requires_grad_(), leaves(unit)
    y = None if y0 is None else y0.clone().requires_grad_()
    (pddm_ext.pddm_scores(x, y, *params) * g).sum().backward()
    xr, params_r = x0.clone().requires_grad_(), leaves(unit)
    yr = None if y0 is None else y0.clone().requires_grad_()
    (reference.pddm_scores(xr, yr, params_r) * g).sum().backward()

    pairs = [("x", x, xr)] + ([] if y is None else [("y", y, yr)]) + list(zip(PARAM_NAMES, params, params_r))
    for name, got, want in pairs:
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-11, msg=name)
        if pattern in ("zero", "antisymmetric"):
            assert torch.count_nonzero(got.grad) == 0, name


@pytest.mark.parametrize("m,n", [(5, 300), (300, 5), (70, 90)], ids=["wide", "tall", "square"])
@pytest.mark.multithreaded
def test_reference_mode_gradients_across_workers(m, n, device):
    """Reference mode hands each worker whole blocks of the longer side and keeps that side's row
    gradients once (shared, each row written by one worker); the shorter side's are per worker.
    Both layouts, with several blocks per worker, must match the reference's autograd."""
    unit = make_unit(6, 5, 4, seed=31, device=device)
    x0, y0 = randn(m, 6, seed=32, device=device), randn(n, 6, seed=33, device=device)
    g = randn(m, n, seed=34, device=device)
    x, y, params = x0.clone().requires_grad_(), y0.clone().requires_grad_(), leaves(unit)
    (pddm_ext.pddm_scores(x, y, *params) * g).sum().backward()
    xr, yr, params_r = x0.clone().requires_grad_(), y0.clone().requires_grad_(), leaves(unit)
    (reference.pddm_scores(xr, yr, params_r) * g).sum().backward()
    for name, got, want in [("x", x, xr), ("y", y, yr)] + list(zip(PARAM_NAMES, params, params_r)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-11, msg=name)


@cpu_kernels_only
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
@pytest.mark.multithreaded
def test_backward_is_reproducible(batch):
    """Each thread sums a fixed set of tiles and the partial sums are added in a fixed order, so
    repeated runs give bitwise identical float32 gradients. Four threads (more than this machine's
    cores, so they finish in a varying order): a merge in arrival order would differ between runs."""
    torch.set_num_threads(4)  # the autouse fixture restores the previous count
    unit = make_unit(16, 12, 8, dtype=torch.float32, seed=21)
    x0 = randn(300, 16, dtype=torch.float32, seed=22)
    y0 = None if batch else randn(200, 16, dtype=torch.float32, seed=23)
    g = randn(300, 300 if batch else 200, dtype=torch.float32, seed=24)
    runs = []
    for _ in range(6):
        x, params = x0.clone().requires_grad_(), leaves(unit, torch.float32)
        y = None if y0 is None else y0.clone().requires_grad_()
        (pddm_ext.pddm_scores(x, y, *params) * g).sum().backward()
        runs.append([x.grad] + ([] if y is None else [y.grad]) + [p.grad for p in params])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@cpu_kernels_only
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_gradients_do_not_follow_the_float32_matmul_precision(batch):
    """The backward's dense products (dx += dP W_v, dW_v = dP^T x) are the kernels' own arithmetic: on
    the CPU, at::mm follows torch.set_float32_matmul_precision, whose "medium" runs float32 matmuls in
    bfloat16 where oneDNN supports it; the gradients must be bitwise the same under every setting."""
    unit = make_unit(64, 48, 32, dtype=torch.float32, seed=31)
    x = randn(70, 64, dtype=torch.float32, seed=32)
    y = None if batch else randn(50, 64, dtype=torch.float32, seed=33)
    g = randn(70, 70 if batch else 50, dtype=torch.float32, seed=34)
    p = [getattr(unit, name).detach() for name in PARAM_NAMES]
    previous = torch.get_float32_matmul_precision()
    results = []
    try:
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            results.append(torch.ops.pddm_ext.scores_backward(g, x, y, *p, [True, True, True]))
    finally:
        torch.set_float32_matmul_precision(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- float32 vs float64


@pytest.mark.parametrize(
    "m,n,d,h,c", [(40, None, 32, 24, 16), (33, 21, 8, 6, 5), (20, None, 128, 128, 128), (17, 30, 128, 128, 128)],
    ids=["batch40", "ref33x21", "batch20-d128", "ref17x30-d128"],
)
@pytest.mark.multithreaded
def test_float32_gradients_match_float64_reference(m, n, d, h, c, device):
    """Tolerance: float32 gradients sum m*n pair contributions (each a chain of three normalised layers)
    with eps = 6e-8; we require each gradient within 1e-4 of its own scale (max |g|) plus 1e-3 relative,
    far above that rounding and far below any real error (a wrong term moves gradients by O(1/mn))."""
    unit = make_unit(d, h, c, dtype=torch.float32, seed=m, device=device)
    x0 = randn(m, d, dtype=torch.float32, seed=1, device=device)
    y0 = None if n is None else randn(n, d, dtype=torch.float32, seed=2, device=device)
    g = randn(m, m if n is None else n, dtype=torch.float32, seed=3, device=device)

    x = x0.clone().requires_grad_()
    y = None if y0 is None else y0.clone().requires_grad_()
    params = leaves(unit, torch.float32)
    S = pddm_ext.pddm_scores(x, y, *params)
    (S * g).sum().backward()

    xr = x0.double().requires_grad_()
    yr = None if y0 is None else y0.double().requires_grad_()
    params_r = leaves(unit, torch.float64)
    (reference.pddm_scores(xr, yr, params_r) * g.double()).sum().backward()

    pairs = [("x", x, xr)] + ([] if y is None else [("y", y, yr)]) + list(zip(PARAM_NAMES, params, params_r))
    for name, got, want in pairs:
        assert got.grad.dtype == torch.float32
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_input_gradients(half):
    """Half inputs compute in float32; their gradient comes back in the input's dtype."""
    unit = make_unit(6, 5, 4, dtype=torch.float32, seed=2)
    x = randn(9, 6, dtype=torch.float32, seed=1).to(half).requires_grad_()
    unit(x).sum().backward()
    assert x.grad.dtype == half
    xr = x.detach().double().requires_grad_()
    reference.pddm_scores(xr, None, leaves(unit)).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=2e-2, atol=2e-2 * xr.grad.abs().max().item())


# --------------------------------------------------------------------------- only the needed gradients


def _grads_vs_reference(x_needs, y_needs, params_need, batch):
    unit = make_unit(5, 4, 3, seed=11)
    x0, y0 = randn(7, 5, seed=1), None if batch else randn(6, 5, seed=2)
    g = randn(7, 7 if batch else 6, seed=3)

    x = x0.clone().requires_grad_(x_needs)
    y = None if batch else y0.clone().requires_grad_(y_needs)
    params = [p.requires_grad_(params_need) for p in leaves(unit)]
    S = pddm_ext.pddm_scores(x, y, *params)
    assert S.requires_grad == (x_needs or (y_needs and not batch) or params_need)
    if S.requires_grad:
        (S * g).sum().backward()

    xr = x0.clone().requires_grad_()
    yr = None if batch else y0.clone().requires_grad_()
    params_r = leaves(unit)
    (reference.pddm_scores(xr, yr, params_r) * g).sum().backward()
    for need, t, tr in [(x_needs, x, xr), (y_needs and not batch, y, yr)] + [
        (params_need, p, pr) for p, pr in zip(params, params_r)
    ]:
        if t is None:
            continue
        if need:
            torch.testing.assert_close(t.grad, tr.grad, rtol=1e-9, atol=1e-10)
        else:
            assert t.grad is None


@pytest.mark.parametrize(
    "x_needs,y_needs,params_need",
    [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True),
     (True, False, True)],
    ids=["x", "y", "params", "x+y", "y+params", "x+params"],
)
def test_only_needed_gradients_reference_mode(x_needs, y_needs, params_need):
    _grads_vs_reference(x_needs, y_needs, params_need, batch=False)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_backward_output_mask_contract(batch, device):
    """scores_backward called directly: an input whose mask entry is False gets an empty (0,) tensor
    (so a memory bank that is not trained costs no (n, d) gradient), parameters not asked for come
    back as zeros, and what is asked for does not depend on what else is."""
    unit = make_unit(7, 6, 5, seed=41, device=device)
    x = randn(10, 7, seed=42, device=device)
    y = None if batch else randn(12, 7, seed=43, device=device)
    grad = randn(10, 10 if batch else 12, seed=44, device=device)
    p = [t.detach() for t in unit.params()]
    full = ops.scores_backward(grad, x, y, *p, [True, not batch, True])
    x_only = ops.scores_backward(grad, x, y, *p, [True, False, False])
    params_only = ops.scores_backward(grad, x, y, *p, [False, False, True])
    assert full[0].shape == x.shape and full[1].shape == ((0,) if batch else y.shape)
    assert x_only[1].shape == (0,) and params_only[0].shape == (0,) and params_only[1].shape == (0,)
    assert all(torch.count_nonzero(g) == 0 for g in x_only[2:])
    torch.testing.assert_close(x_only[0], full[0], rtol=1e-12, atol=0)
    for a, b in zip(full[2:], params_only[2:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    if not batch:
        y_only = ops.scores_backward(grad, x, y, *p, [False, True, False])
        assert y_only[0].shape == (0,)
        torch.testing.assert_close(y_only[1], full[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("x_needs,params_need", [(True, False), (False, True)], ids=["x", "params"])
def test_only_needed_gradients_batch_mode(x_needs, params_need):
    _grads_vs_reference(x_needs, False, params_need, batch=True)


def test_some_parameters_frozen():
    unit = make_unit(5, 4, 3, seed=12)
    unit.W_u.requires_grad_(False)
    unit.b_s.requires_grad_(False)
    x = randn(6, 5, dtype=torch.float32, seed=4).double().requires_grad_()
    unit(x).sum().backward()
    assert unit.W_u.grad is None and unit.b_s.grad is None
    assert unit.W_v.grad is not None and unit.w_s.grad is not None and x.grad is not None
    params_r = leaves(unit)
    reference.pddm_scores(x.detach(), None, params_r).sum().backward()
    torch.testing.assert_close(unit.W_c.grad, params_r[4].grad, rtol=1e-9, atol=1e-10)


def test_no_grad_returns_plain_tensor():
    unit = make_unit(4)
    x = randn(5, 4, seed=1).requires_grad_()
    with torch.no_grad():
        S = unit(x)
    assert not S.requires_grad and S.grad_fn is None


# --------------------------------------------------------------------------- double backward


def test_double_backward_raises_clear_error():
    unit = make_unit(4, 3, 3)
    x = randn(5, 4, seed=1).requires_grad_()
    S = unit(x)
    (gx,) = torch.autograd.grad(S.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_double_backward_raises_for_parameters_too():
    unit = make_unit(4, 3, 3)
    x = randn(5, 4, seed=1)
    y = randn(3, 4, seed=2)
    S = unit(x, y)
    grads = torch.autograd.grad(S.pow(2).sum(), list(unit.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grads[0].sum(), unit.W_u)


# --------------------------------------------------------------------------- opcheck


def _opcheck_inputs(batch, requires_grad):
    unit = make_unit(4, 5, 3, seed=13)
    x = randn(6, 4, seed=1).requires_grad_(requires_grad)
    y = None if batch else randn(5, 4, seed=2).requires_grad_(requires_grad)
    params = [p.requires_grad_(requires_grad) for p in leaves(unit)]
    return x, y, params


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_opcheck_scores(batch, requires_grad):
    x, y, params = _opcheck_inputs(batch, requires_grad)
    # all default test_utils: schema, autograd registration, fake tensor, AOT dispatch (dynamic shapes)
    torch.library.opcheck(ops.scores.default, (x, y, *params))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, False], [False, False, True]],
                         ids=["all", "x", "y", "params"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_opcheck_scores_backward(batch, mask):
    # Inputs do not require grad: scores_backward has no derivative (double backward raises), so
    # test_aot_dispatch_dynamic would only exercise that error.
    x, y, params = _opcheck_inputs(batch, requires_grad=False)
    grad = randn(6, 6 if batch else 5, seed=3)
    torch.library.opcheck(ops.scores_backward.default, (grad, x, y, *params, mask))


MINE_CASES = {
    "batch": lambda x, y, lx, ly: (x, lx, None, None),
    "ref": lambda x, y, lx, ly: (x, lx, y, ly),
}


@pytest.mark.parametrize("k", [-1, 0, 1, 3], ids=["all", "none", "k1", "k3"])
@pytest.mark.parametrize("mode", list(MINE_CASES))
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_opcheck_mine(metric, mode, k):
    """Both mine ops, with every default test_util. The number of mined pairs is data dependent: the
    fake kernel allocates it with ctx.new_dynamic_size(), which test_faketensor and
    test_aot_dispatch_dynamic exercise. Inputs do not require grad: mining is not differentiable
    (docs/design.md#mining), the public API always calls these ops on detached inputs under no_grad, and the ops
    have no autograd formula by design."""
    x, y, _ = _opcheck_inputs(batch=True, requires_grad=False)
    y = randn(5, 4, seed=2)
    lx, ly = torch.tensor([0, 1, 0, 2, 1, 0]), torch.tensor([1, 0, 2, 2, 0])
    args = MINE_CASES[mode](x, y, lx, ly)
    if metric == "pddm":
        params = [p.detach() for p in make_unit(4, 5, 3, seed=13).params()]
        torch.library.opcheck(ops.mine_pddm.default, (*args, *params, k))
    else:
        torch.library.opcheck(ops.mine_euclidean.default, (*args, k))


def test_opcheck_covers_every_op():
    """Guards against an op added to the library without an opcheck test here."""
    registered = {name for name in dir(ops) if not name.startswith("_") and hasattr(getattr(ops, name), "default")}
    registered.discard("cpu_isa")  # no tensors in or out (the CPU's instruction-set levels): nothing to opcheck
    registered.discard("tile_shapes")  # no tensors in or out (the kernels' tile shapes): nothing to opcheck
    assert registered == {"scores", "scores_backward", "mine_pddm", "mine_euclidean"}


# --------------------------------------------------------------------------- on every device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
@pytest.mark.parametrize("m,n,d,h,c", ODD_SHAPES)
def test_gradients_match_reference(m, n, d, h, c, batch, dtype, device):
    unit = make_unit(d, h, c, dtype=dtype, device=device)
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    y = None if batch else torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    S = unit(x) if batch else unit(x, y)
    G = torch.randn_like(S)
    got = torch.autograd.grad((S * G).sum(), [x] + ([] if batch else [y]) + list(unit.parameters()))
    _, want = reference_gradients(x, y, unit, G)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL[dtype]


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_gradcheck_float64(batch, device):
    unit = make_unit(5, 4, 3, dtype=torch.float64, seed=1, device=device)
    x = torch.randn(6, 5, device=device, dtype=torch.float64, requires_grad=True)
    y = None if batch else torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in params_of(unit)]
    inputs = (x,) + (() if batch else (y,)) + tuple(params)

    def fn(*args):
        if batch:
            return pddm_ext.pddm_scores(args[0], None, *args[1:])
        return pddm_ext.pddm_scores(*args)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_output_mask(device):
    unit = make_unit(7, 6, 5, device=device, dtype=torch.float32)
    x = torch.randn(10, 7, device=device)
    y = torch.randn(12, 7, device=device)
    grad = torch.randn(10, 12, device=device)
    p = params_of(unit)
    full = ops.scores_backward(grad, x, y, *p, [True, True, True])
    params_only = ops.scores_backward(grad, x, y, *p, [False, False, True])
    inputs_only = ops.scores_backward(grad, x, y, *p, [True, True, False])
    # an input that needs no gradient gets an empty (0,) tensor; unneeded parameter gradients are zeros
    assert params_only[0].shape == (0,) and params_only[1].shape == (0,) and inputs_only[2].abs().max() == 0
    for a, b in zip(full[2:], params_only[2:]):
        assert rel_err(a, b) < 1e-5
    assert rel_err(full[0], inputs_only[0]) < 1e-5 and rel_err(full[1], inputs_only[1]) < 1e-5


def test_expanded_grad_and_non_contiguous_inputs(device):
    unit = make_unit(8, 6, 5, dtype=torch.float64, device=device)
    base = torch.randn(8, 22, device=device, dtype=torch.float64)
    x = base.t()[::2]  # (11, 8) view with strides (2, 22)
    assert not x.is_contiguous()
    y = torch.randn(8, 13, device=device, dtype=torch.float64).t()  # (13, 8) transposed view
    S = pddm_ext.pddm_scores(x, y, *params_of(unit))
    want = reference.pddm_scores(x, y, params_of(unit))
    assert rel_err(S, want) < 1e-9
    xg = x.clone().requires_grad_()
    pddm_ext.pddm_scores(xg, y, *params_of(unit)).sum().backward()  # grad is an expanded view
    xr = x.clone().requires_grad_()
    reference.pddm_scores(xr, y, params_of(unit)).sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-8


def test_opcheck(device):
    unit = make_unit(6, 5, 4, device=device, dtype=torch.float32)
    x = torch.randn(9, 6, device=device, requires_grad=True)
    y = torch.randn(7, 6, device=device)
    p = params_of(unit)
    torch.library.opcheck(ops.scores.default, (x, y) + p)
    torch.library.opcheck(ops.scores.default, (x, y) + p + (True, torch.bfloat16))
    lx = torch.randint(0, 3, (9,), device=device)
    ly = torch.randint(0, 3, (7,), device=device)
    torch.library.opcheck(ops.mine_euclidean.default, (x.detach(), lx, y, ly, 2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_backward_frozen_bank_and_zero_gradient_tiles(batch, device):
    """Reference mode with y needing no gradient (a frozen bank): no bank-side gradient buffers, the
    same x and parameter gradients; tiles whose dS is all zero are skipped."""
    dtype = torch.float64
    unit = make_unit(9, 7, 5, dtype=dtype, device=device)
    m, n = 21, 30
    x = torch.randn(m, 9, device=device, dtype=dtype)
    y = None if batch else torch.randn(n, 9, device=device, dtype=dtype)
    grad = torch.zeros(m, m if batch else n, device=device, dtype=dtype)
    grad[2, 5] = 1.5  # most 8 x 8 tiles have no gradient at all
    grad[17, -1] = -0.5
    p = params_of(unit)
    full = ops.scores_backward(grad, x, y, *p, [True, True, True])
    frozen = ops.scores_backward(grad, x, y, *p, [True, False, True])
    assert frozen[1].shape == (0,)
    for a, b in zip((full[0],) + full[2:], (frozen[0],) + frozen[2:]):
        assert rel_err(a, b) < 1e-12
    xd = x.clone().requires_grad_()
    yd = None if batch else y.clone().requires_grad_()
    pd = [t.clone().requires_grad_() for t in p]
    R = reference.pddm_scores(xd, yd, pd)
    want = torch.autograd.grad((R * grad).sum(), [xd] + ([] if batch else [yd]) + pd)
    got = [full[0]] + ([] if batch else [full[1]]) + list(full[2:])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-9


def test_backward_with_non_contiguous_parameters(device):
    """A transposed view as W_v (and W_u): the gradient buffers take its strides (zeros_like) and the
    dense products write through them."""
    dtype = torch.float64
    unit = make_unit(9, 7, 5, dtype=dtype, device=device)
    p = list(params_of(unit))
    p[0] = p[0].t().contiguous().t()  # W_u
    p[2] = p[2].t().contiguous().t()  # W_v
    assert not p[0].is_contiguous() and not p[2].is_contiguous()
    x = torch.randn(20, 9, device=device, dtype=dtype)
    y = torch.randn(13, 9, device=device, dtype=dtype)
    grad = torch.randn(20, 13, device=device, dtype=dtype)
    got = ops.scores_backward(grad, x, y, *p, [True, True, True])
    want = ops.scores_backward(grad, x, y, *[t.contiguous() for t in p], [True, True, True])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
