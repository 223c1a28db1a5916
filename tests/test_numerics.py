"""Floating-point cancellation in the fused kernels.

- Near-antipodal pairs (b ~ -a): the kernels form W_v (a + b) as P_a + P_b with P = x W_v^T, which
  cancels; pairs whose sqrt(||a - b||^2 + ||a + b||^2) / ||a + b|| exceeds 8 take W_v (a + b) from
  a + b itself, forward and backward (csrc/pddm_common.h, mean_branch_direct).
- Euclidean mining with a large common offset: ||a||^2 + ||b||^2 - 2 a.b cancels; the CPU kernel
  centres the rows by their mean and recomputes near pairs from the differences (cpu_tile.h).

The oracle is float64 on the same input values (reference.py forms a + b and a - b directly), so
what is measured is the kernels' own rounding. Tolerances: docs/design.md "Ties and tolerance" for mined indices
(conftest.MINING_TOL), test_scores' for scores.
"""

from __future__ import annotations

import math

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from helpers import MINING_TOL, assert_scores_close, make_unit, randn, ref_params
from test_mining import Brute, brute_scores, check_batch_hard, check_quadruplets

# --------------------------------------------------------------------------- near-antipodal pairs

# A case where P_a + P_b cancels: float32, d = 2, h = 2, c = 1 (parameters rounded to 4 digits).
ANTIPODAL_PARAMS = (
    [[0.2422, -0.2534], [0.0587, 0.2521]], [0.2830, 0.1855],
    [[-0.0282, 0.5493], [-0.1942, -0.1569]], [-0.0016, -0.4210],
    [[-0.1927, -0.3351, 0.4160, 0.4198]], [0.1975], [0.9632], -0.2820,
)
ANTIPODAL_A = [0.04223312, -0.99910778]
ANTIPODAL_B = [-0.04223228, 0.99910790]  # ||a + b|| / ||a|| = 8.5e-7


def antipodal_params(dtype=torch.float32):
    return tuple(torch.tensor(p, dtype=dtype) for p in ANTIPODAL_PARAMS)


def test_near_antipodal_example_score_float32():
    params = antipodal_params()
    x = torch.tensor([ANTIPODAL_A, ANTIPODAL_B])
    want = reference.pddm_scores(x.double(), None, tuple(p.double() for p in params))[0, 1].item()
    assert want == pytest.approx(-0.029348, abs=1e-6)
    S = pddm_ext.pddm_scores(x, None, *params)  # was -0.2820 (the cancelled mean branch)
    assert S[0, 1].item() == pytest.approx(want, abs=1e-5)
    assert S[1, 0].item() == S[0, 1].item()
    S_ref_mode = pddm_ext.pddm_scores(x[:1], x[1:], *params)
    assert S_ref_mode.item() == pytest.approx(want, abs=1e-5)
    assert pddm_ext.pair_scores(x[:1], x[1:], params).item() == pytest.approx(want, abs=1e-5)


def test_near_antipodal_example_batch_hard_reference_mode():
    """Query a; references: 2a (positive; not a itself, which the self-copy rule of docs/design.md#mining
    keeps from being a positive), b ~ -a (true S = -0.0293) and c (S = -0.0634), both negatives.
    The cancelled score of (a, b) was -0.2820, which made c the hardest negative."""
    unit = pddm_ext.PDDM(2, 2, 1)
    with torch.no_grad():
        for p, value in zip(unit.params(), antipodal_params()):
            p.copy_(value)
    query = torch.tensor([ANTIPODAL_A])
    c = [2 * math.cos(2.5604), 2 * math.sin(2.5604)]
    refs = torch.tensor([[2 * e for e in ANTIPODAL_A], ANTIPODAL_B, c])
    a, p, n = pddm_ext.batch_hard(query, torch.tensor([0]), unit, ref_emb=refs, ref_labels=torch.tensor([0, 1, 1]))
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0], [0], [1])
    # mine_hard: a second query (label 1) gives the positive pair (0, 0) its positive_negative
    queries, labels = torch.tensor([ANTIPODAL_A, c]), torch.tensor([0, 1])
    q = pddm_ext.mine_hard(queries, labels, unit, ref_emb=refs, ref_labels=torch.tensor([0, 1, 1]))
    assert (q.anchor.tolist(), q.positive.tolist(), q.anchor_negative.tolist()) == ([0], [0], [1])
    assert q.scores[0, 1].item() == pytest.approx(-0.029348, abs=1e-5)


def antipodal_rows(m, d, rel, dtype, seed):
    """m random rows a_t and m rows b_t = -a_t + rel * ||a_t|| * w_t (w_t a random unit vector)."""
    a = randn(m, d, dtype=torch.float64, seed=seed)
    w = torch.nn.functional.normalize(randn(m, d, dtype=torch.float64, seed=seed + 1), dim=1)
    b = -a + rel * a.norm(dim=1, keepdim=True) * w
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("batch", [False, True], ids=["ref", "batch"])
@pytest.mark.parametrize("d,h,c", [(2, 2, 1), (5, 4, 3), (37, 19, 6)])
def test_near_antipodal_float64_scores_and_gradients(d, h, c, batch, device):
    """||a + b|| / ||a|| ~ 1e-9 in float64: scores and every gradient against the reference, which forms
    a + b directly (the factorised mean branch was off by ~1e-6 relative)."""
    a, b = (t.to(device) for t in antipodal_rows(6, d, 1e-9, torch.float64, seed=d))
    unit = make_unit(d, h, c, dtype=torch.float64, seed=h, device=device)
    if batch:
        x = torch.cat([a, b]).requires_grad_()
        S, S_ref_fn = unit(x), lambda xr: reference.pddm_scores(xr, None, unit)
        inputs = (x,)
    else:
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        S, S_ref_fn = unit(x, y), lambda xr, yr: reference.pddm_scores(xr, yr, unit)
        inputs = (x, y)
    G = randn(*S.shape, dtype=torch.float64, seed=7, device=device)
    grads = torch.autograd.grad((S * G).sum(), (*inputs, *unit.params()))
    ref_inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    S_ref = S_ref_fn(*ref_inputs)
    grads_ref = torch.autograd.grad((S_ref * G).sum(), (*ref_inputs, *unit.params()))
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    names = ["x", "y"][: len(inputs)] + list(reference.PARAM_NAMES)
    for name, g, g_ref in zip(names, grads, grads_ref):
        # The input gradient of an antipodal pair is (I - n n^T) W_v^T g / ||a + b|| (n = normalize(a + b)):
        # terms of size ~1e9 that cancel, so any implementation, the reference included, carries
        # ~1e9 * 1.1e-16 * (a few) absolute error there. The cancelled mean branch was off by ~1e2.
        scale = max(1.0, g_ref.abs().max().item())
        atol = 1e-9 * scale + (1e-5 if name in ("x", "y") else 0.0)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=atol, msg=lambda m: f"grad {name}: {m}")


def test_near_antipodal_pair_scores_gradients():
    """pair_scores (the loss's path) forms W_v (a + b) from a + b too."""
    a, b = antipodal_rows(5, 7, 1e-9, torch.float64, seed=3)
    unit = make_unit(7, 5, 4, dtype=torch.float64, seed=1)
    a.requires_grad_()
    s = unit.pair_scores(a, b)
    s_ref = reference.pair_scores(a, b, unit)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(s.sum(), (a, unit.W_v))
    g_ref = torch.autograd.grad(s_ref.sum(), (a, unit.W_v))
    for t, t_ref in zip(g, g_ref):
        torch.testing.assert_close(t, t_ref, rtol=1e-9, atol=1e-9 * t_ref.abs().max().item())


def mixed_batch(m, d, dtype, seed, rel):
    """Ordinary random rows with a third of them replaced by near-antipodes of others."""
    x = randn(m, d, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randperm(m, generator=g)[: m // 3]
    dst = torch.randperm(m, generator=g)[: m // 3]
    w = torch.nn.functional.normalize(torch.randn(len(dst), d, dtype=torch.float64, generator=g), dim=1)
    x[dst] = -x[src] + rel * x[src].norm(dim=1, keepdim=True) * w
    return x.to(dtype)


# float32 near-antipodes at ||a + b|| / ||a|| = 1e-5 (the cancelled branch was off by ~1e-2 there)
REL = {torch.float64: 1e-9, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m,n,d,h,c", [(29, None, 3, 5, 4), (31, 23, 6, 7, 5), (40, None, 128, 128, 128)])
def test_antipodal_pairs_mixed_into_batches(m, n, d, h, c, dtype, device):
    x = mixed_batch(m, d, dtype, seed=m, rel=REL[dtype]).to(device)
    y = None if n is None else torch.cat([-x[: n // 2] * (1 + REL[dtype]),
                                          randn(n - n // 2, d, dtype=dtype, seed=5, device=device)])
    unit = make_unit(d, h, c, dtype=dtype, seed=d, device=device)
    S = unit(x, y)
    S_ref = reference.pddm_scores(x.double(), None if y is None else y.double(), ref_params(unit))
    assert_scores_close(S, S_ref, dtype)
    # gradients: float64 only (float32 input gradients of antipodal pairs are ~1/||a + b||, ill-conditioned)
    if dtype == torch.float64:
        xr = x.clone().requires_grad_()
        G = randn(*S.shape, dtype=dtype, seed=9, device=device)
        g = torch.autograd.grad((unit(xr, y) * G).sum(), (xr, unit.W_v, unit.b_v))
        xr2 = x.clone().requires_grad_()
        g_ref = torch.autograd.grad((reference.pddm_scores(xr2, y, unit) * G).sum(), (xr2, unit.W_v, unit.b_v))
        for t, t_ref in zip(g, g_ref):
            torch.testing.assert_close(t, t_ref, rtol=1e-8, atol=1e-8 * max(1.0, t_ref.abs().max().item()))


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("mode", ["batch", "ref"])
def test_mining_with_antipodal_pairs(mode, dtype_name, device):
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype_name]
    d = 4
    x = mixed_batch(26, d, dtype, seed=4, rel=REL[dtype])
    lx = torch.arange(26) % 5
    unit = make_unit(d, 6, 4, dtype=dtype, seed=2)
    if mode == "batch":
        y, ly, kwargs = x, lx, {}
    else:
        y = torch.cat([-x[:10] * (1 + REL[dtype]), randn(9, d, dtype=dtype, seed=8)])
        ly = (torch.arange(19) + 1) % 5
        kwargs = dict(ref_emb=y, ref_labels=ly)
    brute = Brute(brute_scores(x, y, ref_params(unit), "pddm"), lx.tolist(), ly.tolist(), mode == "batch")
    tol = MINING_TOL[dtype]
    x, lx, unit = x.to(device), lx.to(device), unit.to(device)  # the brute force above scored the CPU copies
    kwargs = {key: value.to(device) for key, value in kwargs.items()}
    check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=None, **kwargs), brute, None, tol)
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, tol)


# --------------------------------------------------------------------------- Euclidean offsets


def test_large_common_offset_example():
    x = torch.tensor([[1000.0], [1000.1], [1000.2], [1000.3]])
    labels = torch.tensor([0, 0, 0, 1])
    a, p, n = pddm_ext.batch_hard(x, labels)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0, 1, 2], [2, 2, 0], [3, 3, 3])
    q = pddm_ext.mine_hard(x, labels, k=None)
    brute = Brute(brute_scores(x, x, None, "euclidean"), labels.tolist(), labels.tolist(), True)
    check_quadruplets(q, brute, None, MINING_TOL[torch.float32])
    # reference mode: the same rows as a memory bank. A row is not its own positive (the self-copy rule
    # of docs/design.md#mining), so the triplets are batch mode's (row 3 has no other positive).
    a, p, n = pddm_ext.batch_hard(x, labels, ref_emb=x, ref_labels=labels)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0, 1, 2], [2, 2, 0], [3, 3, 3])


def offset_rows(m, d, dtype, seed, offset, spread):
    base = offset * torch.nn.functional.normalize(randn(1, d, dtype=torch.float64, seed=seed), dim=1)
    return (base + spread * randn(m, d, dtype=torch.float64, seed=seed + 1)).to(dtype)


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("m,n,d,offset,spread", [(23, 17, 1, 1000.0, 0.1), (37, 41, 6, 1e4, 1.0),
                                                 (70, 150, 33, 300.0, 0.01)])
def test_euclidean_mining_with_common_offset(m, n, d, offset, spread, mode, dtype_name, device):
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype_name]
    x = offset_rows(m, d, dtype, seed=d, offset=offset, spread=spread)
    lx = torch.randint(0, 4, (m,), generator=torch.Generator().manual_seed(d))
    if mode == "batch":
        y, ly, kwargs = x, lx, {}
    else:
        # the references share the offset, plus their own (a memory bank of the same region)
        y = offset_rows(n, d, dtype, seed=d, offset=offset, spread=spread * 2)
        ly = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(d + 1))
        kwargs = dict(ref_emb=y, ref_labels=ly)
    brute = Brute(brute_scores(x, y, None, "euclidean"), lx.tolist(), ly.tolist(), mode == "batch")
    tol = MINING_TOL[dtype]
    x, lx = x.to(device), lx.to(device)  # the brute force above scored the CPU copies
    kwargs = {key: value.to(device) for key, value in kwargs.items()}
    for k in (1, None):
        check_quadruplets(pddm_ext.mine_hard(x, lx, k=k, **kwargs), brute, k, tol)
    check_batch_hard(pddm_ext.batch_hard(x, lx, **kwargs), brute, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_euclidean_near_pairs_far_from_the_centre(dtype):
    """Rows spread over a radius of 1000 (centring cannot help) with close partners 1e-2 away:
    the near pairs are recomputed from their differences."""
    x = 1000 * randn(30, 5, dtype=torch.float64, seed=1)
    x[15:] = x[:15] + 1e-2 * randn(15, 5, dtype=torch.float64, seed=2)
    x = x.to(dtype)
    labels = torch.arange(30) % 7
    brute = Brute(brute_scores(x, x, None, "euclidean"), labels.tolist(), labels.tolist(), True)
    check_quadruplets(pddm_ext.mine_hard(x, labels, k=None), brute, None, MINING_TOL[dtype])
    check_batch_hard(pddm_ext.batch_hard(x, labels), brute, MINING_TOL[dtype])


@pytest.mark.parametrize("mode", ["batch", "ref"])
def test_euclidean_duplicates_with_offset_tie_exactly(mode):
    """Duplicate rows far from the origin stay exactly 0 apart, and ties go to the smallest index."""
    x = offset_rows(12, 3, torch.float32, seed=5, offset=1000.0, spread=0.5)
    x[7] = x[2]
    x[9] = x[2]
    x[4] = x[1]
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 7, 2, 8, 1])
    if mode == "batch":
        brute = Brute(brute_scores(x, x, None, "euclidean"), labels.tolist(), labels.tolist(), True)
        check_quadruplets(pddm_ext.mine_hard(x, labels, k=None), brute, None, MINING_TOL[torch.float32])
        a, p, n = pddm_ext.batch_hard(x, labels)
        hard_neg = dict(zip(a.tolist(), n.tolist()))
        assert hard_neg[2] == 7 and hard_neg[9] == 7  # x[7] = x[2] = x[9]: distance exactly 0
        assert hard_neg[1] == 4 and hard_neg[7] == 2  # x[7]'s duplicates 2 and 9 tie: smallest index
        S = pddm_ext.mine_hard(x, labels, k=None).scores
        assert (S[:, 0] == 0).sum().item() == 1
    else:
        # Equal rows with one label are no positive pairs (the self-copy rule of docs/design.md#mining):
        # query 2's copy and its duplicate x[9], query 1's copy. Equal rows with another label are
        # negatives at distance exactly 0, the smallest index winning.
        q = pddm_ext.mine_hard(x[:3], labels[:3], k=None, ref_emb=x, ref_labels=labels)
        assert not set(zip(q.anchor.tolist(), q.positive.tolist())) & {(2, 2), (2, 9), (1, 1)}
        res = pddm_ext.ops.mine(x[:3], labels[:3], x, labels, None, -1, "euclidean")
        assert res.hardest_positive[2].item() == -1
        assert res.hardest_negative.tolist()[1:] == [4, 7]  # duplicates of the query at distance 0, smallest index
        assert res.hardest_negative_score.tolist()[1:] == [0.0, 0.0]
