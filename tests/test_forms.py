"""The two forms of the PDDM unit (docs/design.md "The two forms") and its dropout.

``normalize_inputs=True`` scales u and v by their inverse norms before W_u and W_v (the default and
the form of every other test file); ``normalize_inputs=False`` feeds them as they are, so S sees the
distance between a and b. The fused kernels only keep or drop that per-pair scale: here every path
(scores, gradients, opcheck, mining in both modes, pair_scores) runs the distance-aware form against
``pddm_ext.reference`` (float64 on the same values), with test_scores' tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from helpers import MINING_TOL, assert_scores_close, make_unit, randn, ref_params
from test_mining import Brute, check_batch_hard, check_quadruplets, make_labels

# (m, n, d, h, c): m = 2, d = 1, sizes that straddle the CPU tiles (32 x 32 pairs at the small widths,
# 17 x 17 in float32 and 12 x 12 in float64 at d = h = c = 128; csrc/cpu/tile_shapes.h)
SHAPES = [(2, None, 1, 1, 1), (2, 3, 1, 2, 2), (33, None, 7, 9, 4), (17, 65, 4, 8, 3), (40, None, 128, 128, 128)]
IDS = [f"m{s[0]}n{s[1]}d{s[2]}h{s[3]}c{s[4]}" for s in SHAPES]


def distance_aware_unit(d, h, c, dtype, seed, device="cpu"):
    unit = make_unit(d, h, c, dtype=dtype, seed=seed, device=device)
    unit.normalize_inputs = False
    return unit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m,n,d,h,c", SHAPES, ids=IDS)
@pytest.mark.parametrize("normalize_inputs", [False, True], ids=["distance_aware", "normalised"])
def test_scores_both_forms_match_reference(m, n, d, h, c, dtype, normalize_inputs, device):
    unit = make_unit(d, h, c, dtype=dtype, seed=m + d, device=device)
    x = randn(m, d, dtype=dtype, seed=1, device=device)
    y = None if n is None else randn(n, d, dtype=dtype, seed=2, device=device)
    S = pddm_ext.pddm_scores(x, y, *unit.params(), normalize_inputs=normalize_inputs)
    S_ref = reference.pddm_scores(x.double(), None if y is None else y.double(), ref_params(unit),
                                  normalize_inputs=normalize_inputs)
    assert_scores_close(S, S_ref, dtype)
    unit.normalize_inputs = normalize_inputs
    assert torch.equal(unit(x, y), S)  # the module computes its own form


def test_the_forms_differ_and_the_default_is_normalised():
    unit = make_unit(4, 5, 3, seed=0)
    x = randn(9, 4, seed=3)
    assert pddm_ext.PDDM(4).normalize_inputs is True
    normalised = pddm_ext.pddm_scores(x, None, *unit.params())
    assert torch.equal(normalised, pddm_ext.pddm_scores(x, None, *unit.params(), normalize_inputs=True))
    distance_aware = pddm_ext.pddm_scores(x, None, *unit.params(), normalize_inputs=False)
    assert (normalised - distance_aware).abs().max() > 1e-3


def test_distance_aware_form_sees_the_distance():
    """a = cos(phi) p + sin(phi) w, b = cos(phi) p - sin(phi) w keeps the directions of
    |a - b| and a + b, so the input-normalised S is constant in phi; the distance-aware S is not."""
    p, w = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    p[0], w[1] = 1.0, 1.0
    phis = torch.linspace(0.05, 1.0, 8, dtype=torch.float64)
    a = torch.cos(phis)[:, None] * p + torch.sin(phis)[:, None] * w
    b = torch.cos(phis)[:, None] * p - torch.sin(phis)[:, None] * w
    unit = make_unit(6, 8, 5, seed=4)
    s_norm = unit.pair_scores(a, b)
    assert (s_norm - s_norm[0]).abs().max() < 1e-12
    unit.normalize_inputs = False
    s_dist = unit.pair_scores(a, b)
    assert (s_dist.max() - s_dist.min()) > 1e-3
    torch.testing.assert_close(s_dist, reference.pair_scores(a, b, unit), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,n,d,h,c", [(2, None, 1, 2, 2), (5, 3, 3, 4, 2), (9, None, 4, 3, 5)])
def test_gradcheck_distance_aware(m, n, d, h, c, device):
    unit = distance_aware_unit(d, h, c, torch.float64, seed=m, device=device)
    x = randn(m, d, seed=5, device=device).requires_grad_()
    y = None if n is None else randn(n, d, seed=6, device=device).requires_grad_()
    inputs = (x,) if y is None else (x, y)

    def f(*args):
        xs = args[0]
        ys = None if y is None else args[1]
        return pddm_ext.pddm_scores(xs, ys, *args[len(inputs):], normalize_inputs=False)

    params = tuple(p.detach().clone().requires_grad_() for p in unit.params())
    assert torch.autograd.gradcheck(f, (*inputs, *params), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_gradients_distance_aware_match_reference(batch, dtype, device):
    """Across several tiles and workers: every gradient against float64 autograd of the reference."""
    m, n, d, h, c = 45, 38, 7, 6, 5
    unit = distance_aware_unit(d, h, c, dtype, seed=3, device=device)
    x = randn(m, d, dtype=dtype, seed=7, device=device)
    y = None if batch else randn(n, d, dtype=dtype, seed=8, device=device)
    G = randn(m, m if batch else n, dtype=torch.float64, seed=9, device=device)
    inputs = [x.clone().requires_grad_()] + ([] if batch else [y.clone().requires_grad_()])
    S = unit(inputs[0], None if batch else inputs[1])
    grads = torch.autograd.grad((S.double() * G).sum(), (*inputs, *unit.params()))
    ref_unit = tuple(p.detach().double().requires_grad_() for p in unit.params())
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    S_ref = reference.pddm_scores(ref_inputs[0], None if batch else ref_inputs[1], ref_unit, normalize_inputs=False)
    grads_ref = torch.autograd.grad((S_ref * G).sum(), (*ref_inputs, *ref_unit))
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=rtol, atol=rtol * max(1.0, g_ref.abs().max().item()))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_opcheck_distance_aware(batch):
    ops = torch.ops.pddm_ext
    unit = make_unit(3, 4, 2, seed=1)
    params = tuple(p.detach().clone().requires_grad_() for p in unit.params())
    x = randn(5, 3, seed=1).requires_grad_()
    y = None if batch else randn(4, 3, seed=2).requires_grad_()
    torch.library.opcheck(ops.scores.default, (x, y, *params, False))
    grad = randn(5, 5 if batch else 4, seed=3)
    detached = tuple(p.detach() for p in params)
    torch.library.opcheck(ops.scores_backward.default,
                          (grad, x.detach(), None if y is None else y.detach(), *detached, [True, True, True], False))
    labels = torch.tensor([0, 1, 0, 1, 2])
    args = (x.detach(), labels, None, None) if batch else (x.detach(), labels, y.detach(), torch.tensor([1, 0, 2, 2]))
    torch.library.opcheck(ops.mine_pddm.default, (*args, *detached, 2, False), test_utils=("test_schema",
                                                                                           "test_faketensor"))


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("layout", ["pairs", "random", "unbalanced"])
def test_mining_distance_aware(layout, mode, dtype_name, device):
    """mine_hard / batch_hard with a distance-aware unit (its form is taken from the module) and with
    the keyword on a normalised one, against docs/design.md "Ties and tolerance" applied to the reference's score table."""
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype_name]
    m, n, d = 37, 41, 5
    unit = distance_aware_unit(d, 6, 4, dtype, seed=2, device=device)
    x = randn(m, d, dtype=dtype, seed=11, device=device)
    lx = make_labels(layout, m, 12).to(device)
    if mode == "batch":
        y, ly, kwargs = x, lx, {}
    else:
        y, ly = randn(n, d, dtype=dtype, seed=13, device=device), make_labels(layout, n, 14).to(device)
        kwargs = dict(ref_emb=y, ref_labels=ly)
    S = reference.pddm_scores(x.double(), y.double(), ref_params(unit), normalize_inputs=False).tolist()
    brute = Brute(S, lx.tolist(), ly.tolist(), mode == "batch")
    tol = MINING_TOL[dtype]
    for k in (1, 4, None):
        check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs), brute, k, tol)
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, tol)
    # the keyword overrides the unit's form
    unit.normalize_inputs = True
    check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=None, normalize_inputs=False, **kwargs), brute, None, tol)
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, normalize_inputs=False, **kwargs), brute, tol)


def test_loss_trains_through_the_units_form():
    """PDDMLoss mines and scores with its unit's form: its value equals the reference loss of that form."""
    loss_fn = pddm_ext.PDDMLoss(6, bce_weight=0.0).double()  # the paper's loss, as the reference
    loss_fn.unit.normalize_inputs = False
    x = randn(16, 6, seed=3)
    labels = torch.arange(16) // 4
    loss = loss_fn(x, labels)
    ref_loss, *_ = reference.pddm_loss(x, labels, loss_fn.unit)  # reads unit.normalize_inputs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    loss_fn.unit.normalize_inputs = True
    assert not torch.allclose(loss_fn(x, labels), loss)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, torch.tensor(True)])
def test_normalize_inputs_must_be_a_bool(bad):
    unit = make_unit(3, seed=0)
    x = randn(4, 3, seed=0)
    with pytest.raises(TypeError, match="normalize_inputs"):
        pddm_ext.PDDM(3, normalize_inputs=bad)
    with pytest.raises(TypeError, match="normalize_inputs"):
        pddm_ext.pddm_scores(x, None, *unit.params(), normalize_inputs=bad)
    with pytest.raises(TypeError, match="normalize_inputs"):
        pddm_ext.pair_scores(x, x, unit.params(), normalize_inputs=bad)
    if bad is not None:  # None means "the unit's form" in mining
        with pytest.raises(TypeError, match="normalize_inputs"):
            pddm_ext.mine_hard(x, torch.tensor([0, 0, 1, 1]), unit, normalize_inputs=bad)
        with pytest.raises(TypeError, match="normalize_inputs"):
            pddm_ext.batch_hard(x, torch.tensor([0, 0, 1, 1]), unit, normalize_inputs=bad)


# --------------------------------------------------------------------------- the module


def test_module_keyword_repr_and_state_dict():
    unit = pddm_ext.PDDM(4, 3, normalize_inputs=False)
    assert unit.normalize_inputs is False
    assert "normalize_inputs=False" in repr(unit)
    state = unit.state_dict()
    assert state["_extra_state"] == {"normalize_inputs": False}
    other = pddm_ext.PDDM(4, 3)
    other.load_state_dict(state)
    assert other.normalize_inputs is False
    x = randn(5, 4, dtype=torch.float32, seed=1)
    assert torch.equal(other(x), unit(x))
    # weights_only loading (plain types only)
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    pddm_ext.PDDM(4, 3).load_state_dict(torch.load(buffer, weights_only=True))


def test_old_state_dict_keeps_the_normalised_form():
    """A state_dict saved before normalize_inputs existed holds only the parameters: it loads (strict)
    as the input-normalised form it was trained with, whatever the new module's constructor said."""
    old = {name: p.detach().clone() for name, p in pddm_ext.PDDM(4, 3).named_parameters()}
    unit = pddm_ext.PDDM(4, 3, normalize_inputs=False)
    unit.load_state_dict(old)
    assert unit.normalize_inputs is True
    loss_fn = pddm_ext.PDDMLoss(4, 3)
    loss_fn.unit.normalize_inputs = False
    loss_fn.load_state_dict({f"unit.{name}": t for name, t in old.items()})
    assert loss_fn.unit.normalize_inputs is True
    with pytest.raises(ValueError, match="normalize_inputs"):
        unit.load_state_dict({**old, "_extra_state": {"normalize_inputs": "no"}})


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("bad,error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                       ("0.5", TypeError), (True, TypeError)])
def test_dropout_is_validated(bad, error):
    with pytest.raises(error, match="dropout"):
        pddm_ext.PDDM(4, dropout=bad)


def test_dropout_only_in_training_mode():
    unit = make_unit(5, 6, 7, seed=0)
    plain = make_unit(5, 6, 7, seed=0)
    unit.dropout = 0.5
    x = randn(8, 5, seed=1)
    unit.eval()
    assert torch.equal(unit(x), plain(x))
    assert torch.equal(unit.pair_scores(x[:4], x[4:]), plain.pair_scores(x[:4], x[4:]))
    labels = torch.arange(8) // 2
    unit.train()  # mining never drops
    q, q_plain = pddm_ext.mine_hard(x, labels, unit, k=None), pddm_ext.mine_hard(x, labels, plain, k=None)
    for field in ("anchor", "positive", "anchor_negative", "positive_negative", "scores"):
        assert torch.equal(getattr(q, field), getattr(q_plain, field))
    assert repr(unit).endswith("dropout=0.5)") or "dropout=0.5" in repr(unit)


def test_dropout_in_training_mode():
    p = 0.4
    unit = pddm_ext.PDDM(5, 6, 16, dropout=p, dtype=torch.float64)
    x = randn(7, 5, seed=2)
    a, b = randn(300, 5, seed=3), randn(300, 5, seed=4)
    # pair_scores: inverted dropout on q, one mask per pair
    torch.manual_seed(0)
    s = unit.pair_scores(a, b)
    torch.manual_seed(0)
    W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = unit.params()
    u = torch.nn.functional.normalize((a - b).abs(), dim=1)
    v = torch.nn.functional.normalize((a + b) / 2, dim=1)
    joint = torch.cat([torch.nn.functional.normalize(torch.relu(u @ W_u.T + b_u), dim=1),
                       torch.nn.functional.normalize(torch.relu(v @ W_v.T + b_v), dim=1)], dim=1)
    q = torch.nn.functional.dropout(torch.relu(joint @ W_c.T + b_c), p, training=True)
    torch.testing.assert_close(s, q @ w_s + b_s, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s, unit.eval().pair_scores(a, b))
    unit.train()
    # unit(x): one mask over the joint units per call, shared by all pairs (w_s rescaled)
    torch.manual_seed(1)
    S = unit(x)
    torch.manual_seed(1)
    keep = torch.bernoulli(torch.full_like(unit.w_s, 1 - p))
    masked = (W_u, b_u, W_v, b_v, W_c, b_c, w_s * keep / (1 - p), b_s)
    torch.testing.assert_close(S, reference.pddm_scores(x, None, masked), rtol=1e-10, atol=1e-10)
    S.sum().backward()  # gradients flow through the mask into w_s
    assert unit.w_s.grad is not None
    assert (unit.w_s.grad[keep == 0] == 0).all() and (unit.w_s.grad[keep == 1] != 0).any()
