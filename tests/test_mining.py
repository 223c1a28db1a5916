"""Hard mining (docs/design.md#mining): fused ``mine_hard`` / ``batch_hard`` against a brute-force loop.

The brute force below scores every pair one at a time with the formula of docs/design.md#the-pddm-unit (or
-||a - b||^2) in float64 and applies §3 literally with Python loops. A mined index is accepted when
its brute-force score is within ``tol * (1 + |best|)`` of the optimum of its slot (docs/design.md#ties-and-tolerance:
tol = 1e-5 for float64, 1e-4 for float32), except in the exact-tie tests, where duplicated rows make
ties exact and the smallest index must win.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import pddm_ext
from pddm_ext import ops as pddm_ops
from pddm_ext import reference
from pddm_ext._tiles import tile_shapes
from helpers import (EMULATED, MINING_TOL, bank_case, check_bank_mining, cpu_kernels_only, make_unit, params_of, randn,
                     ref_params, rel_err)

D, H, C = 5, 6, 4


# --------------------------------------------------------------------------- brute force


def _normalize(z):
    return z / max(z.norm().item(), 1e-12)


def pair_score(a, b, params, metric):
    """S(a, b) of one pair (1-D vectors), docs/design.md#the-pddm-unit / #mining, written from the equations."""
    if metric == "euclidean":
        return -((a - b) ** 2).sum().item()
    W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = params
    u1 = torch.relu(W_u @ _normalize((a - b).abs()) + b_u)
    v1 = torch.relu(W_v @ _normalize((a + b) / 2) + b_v)
    q = torch.relu(W_c @ torch.cat([_normalize(u1), _normalize(v1)]) + b_c)
    return (w_s @ q + b_s).item()


def brute_scores(x, y, params, metric):
    """S[i][r] for every query i and reference r, one pair at a time (float64 Python floats)."""
    x, y = x.double(), y.double()
    return [[pair_score(x[i], y[r], params, metric) for r in range(y.shape[0])] for i in range(x.shape[0])]


def equal_rows(x, y):
    """equal[i][r]: rows x_i and y_r equal feature by feature (Python floats: -0.0 == 0.0)."""
    xs, ys = x.tolist(), y.tolist()
    return [[a == b for b in ys] for a in xs]


class Brute:
    """docs/design.md#mining applied literally to a score table S (lists of floats). ``equal`` (reference
    mode): the table of equal rows, whose same-label pairs are no positive pairs (the self-copy rule)."""

    def __init__(self, S, lx, ly, batch, equal=None):
        self.S, self.lx, self.ly, self.batch = S, lx, ly, batch
        self.m, self.n = len(lx), len(ly)
        self.equal = equal

    def positive(self, i, r):
        if self.batch and i == r:
            return False
        return self.lx[i] == self.ly[r] and not (not self.batch and self.equal is not None and self.equal[i][r])

    def negative(self, i, r):
        return self.lx[i] != self.ly[r]

    @functools.cached_property
    def hardest_negative(self):
        out = []
        for i in range(self.m):
            best = -1
            for r in range(self.n):  # ascending r and a strict '>' keep the smallest index on ties
                if self.negative(i, r) and (best < 0 or self.S[i][r] > self.S[i][best]):
                    best = r
            out.append(best)
        return out

    @functools.cached_property
    def hardest_positive(self):
        out = []
        for i in range(self.m):
            best = -1
            for r in range(self.n):
                if self.positive(i, r) and (best < 0 or self.S[i][r] < self.S[i][best]):
                    best = r
            out.append(best)
        return out

    @functools.cached_property
    def hardest_negative_of_ref(self):
        out = []
        for r in range(self.n):
            best = -1
            for i in range(self.m):
                if self.negative(i, r) and (best < 0 or self.S[i][r] > self.S[best][r]):
                    best = i
            out.append(best)
        return out

    @functools.cached_property
    def sorted_positive_pairs(self):
        """All positive pairs (batch mode: i < r) as (S, i, r), by S ascending then (i, r)."""
        pairs = [
            (self.S[i][r], i, r)
            for i in range(self.m)
            for r in range(self.n)
            if self.positive(i, r) and (not self.batch or i < r)
        ]
        return sorted(pairs)

    def kept_pairs(self, k):
        pairs = self.sorted_positive_pairs
        return pairs if k is None else pairs[:k]

    def quadruplets(self, k):
        hn, hnr = self.hardest_negative, self.hardest_negative_of_ref
        return [(i, r, hn[i], hnr[r]) for _, i, r in self.kept_pairs(k) if hn[i] >= 0 and hnr[r] >= 0]

    def batch_hard(self):
        hp, hn = self.hardest_positive, self.hardest_negative
        return [(i, hp[i], hn[i]) for i in range(self.m) if hp[i] >= 0 and hn[i] >= 0]


def close(value, best, tol):
    return abs(value - best) <= tol * (1 + abs(best))


def check_quadruplets(q, brute, k, tol):
    """Checks fused Quadruplets against the brute force, slot by slot, with the tolerance of docs/design.md#ties-and-tolerance."""
    S = brute.S
    expected = brute.quadruplets(k)
    for t in (q.anchor, q.positive, q.anchor_negative, q.positive_negative):
        assert t.dtype == torch.int64 and t.shape == (len(expected),)
    assert q.scores.shape == (len(expected), 3)
    assert q.batch_mode == brute.batch
    # the kept pairs are the first ones of the sorted list and every one of them survives (no -1),
    # since a missing negative skips all pairs or none (see test_skipping_is_all_or_nothing)
    ref_pairs = brute.kept_pairs(k)
    seen = set()
    fused_s = q.scores[:, 0].tolist()
    assert fused_s == sorted(fused_s), "pairs must come out by ascending score"
    for t, (i, r, kk, ll) in enumerate(zip(*(v.tolist() for v in q[:4]))):
        assert brute.positive(i, r), f"slot {t}: ({i}, {r}) is not a positive pair"
        if brute.batch:
            assert i < r, f"slot {t}: batch-mode pair ({i}, {r}) must have i < r"
        assert (i, r) not in seen, f"slot {t}: pair ({i}, {r}) repeated"
        seen.add((i, r))
        assert close(S[i][r], ref_pairs[t][0], tol), f"slot {t}: S{(i, r)}={S[i][r]} vs best {ref_pairs[t][0]}"
        best_k = brute.hardest_negative[i]
        assert brute.negative(i, kk), f"slot {t}: anchor_negative {kk} is not a negative of {i}"
        assert close(S[i][kk], S[i][best_k], tol), f"slot {t}: S{(i, kk)} vs best S{(i, best_k)}"
        best_l = brute.hardest_negative_of_ref[r]
        assert brute.negative(ll, r), f"slot {t}: positive_negative {ll} is not a negative of {r}"
        assert close(S[ll][r], S[best_l][r], tol), f"slot {t}: S{(ll, r)} vs best S{(best_l, r)}"
        for got, want in zip(q.scores[t].tolist(), (S[i][r], S[i][kk], S[ll][r])):
            assert close(got, want, tol), f"slot {t}: scores {q.scores[t].tolist()}"


def check_batch_hard(result, brute, tol):
    a, p, n = result
    S = brute.S
    expected = brute.batch_hard()
    for t in (a, p, n):
        assert t.dtype == torch.int64 and t.shape == (len(expected),)
    assert a.tolist() == [e[0] for e in expected]  # the anchors do not depend on scores
    for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        assert brute.positive(i, pi) and brute.negative(i, ni)
        assert close(S[i][pi], S[i][brute.hardest_positive[i]], tol), f"anchor {i}: positive {pi}"
        assert close(S[i][ni], S[i][brute.hardest_negative[i]], tol), f"anchor {i}: negative {ni}"


# --------------------------------------------------------------------------- cases


def _shuffle(labels, seed):
    g = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=g)]


def make_labels(layout, count, seed, offset=0):
    if layout == "distinct":
        labels = torch.arange(count) + offset
    elif layout == "one":
        labels = torch.zeros(count, dtype=torch.int64)
    elif layout == "pairs":
        labels = _shuffle(torch.arange(count) // 2, seed)
    elif layout == "unbalanced":  # one big class, a few small ones, singletons
        sizes = [count // 2, count // 4, 3, 2]
        labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
        labels = torch.cat([labels, torch.arange(count - len(labels)) + 10])
        labels = _shuffle(labels, seed)
    elif layout == "random":
        labels = torch.randint(0, 4, (count,), generator=torch.Generator().manual_seed(seed))
    else:
        raise AssertionError(layout)
    return labels


LAYOUTS = ["distinct", "one", "pairs", "unbalanced", "random"]
DTYPES = {"f64": torch.float64, "f32": torch.float32}


@functools.lru_cache(maxsize=None)
def mining_case(metric, mode, layout, dtype_name, m=24, n=29, d=D, seed=0):
    """Inputs, fused arguments and brute force of one mining case (cached across k)."""
    dtype = DTYPES[dtype_name]
    unit = make_unit(d, H, C, dtype=dtype, seed=seed) if metric == "pddm" else None
    params = ref_params(unit) if unit is not None else None
    x = randn(m, d, dtype=dtype, seed=seed + 1)
    lx = make_labels(layout, m, seed + 2)
    if mode == "batch":
        y, ly, kwargs = x, lx, {}
    else:
        y = randn(n, d, dtype=dtype, seed=seed + 3)
        # "distinct" in reference mode: no reference shares a label with a query
        ly = make_labels(layout, n, seed + 4, offset=1000 if layout == "distinct" else 0)
        kwargs = dict(ref_emb=y, ref_labels=ly)
    kwargs["metric"] = metric
    brute = Brute(brute_scores(x, y, params, metric), lx.tolist(), ly.tolist(), mode == "batch", equal_rows(x, y))
    return x, lx, unit, kwargs, brute, MINING_TOL[dtype]


def on_device(device, x, lx, unit, kwargs):
    """A case's embeddings, labels, unit and reference-mode keywords on `device` (the cached case itself stays
    on the CPU)."""
    if device == "cpu":
        return x, lx, unit, kwargs
    kwargs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in kwargs.items()}
    return x.to(device), lx.to(device), None if unit is None else copy.deepcopy(unit).to(device), kwargs


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("k", [1, 3, None], ids=["k1", "k3", "kall"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_mine_hard_vs_brute_force(metric, mode, layout, k, dtype_name, device):
    x, lx, unit, kwargs, brute, tol = mining_case(metric, mode, layout, dtype_name)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    q = pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs)
    check_quadruplets(q, brute, k, tol)
    if layout in ("distinct", "one"):
        assert q.anchor.numel() == 0
    # the reference oracle obeys the same rule
    check_quadruplets(reference.mine_hard(x, lx, unit, k=k, **kwargs), brute, k, tol)


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_batch_hard_vs_brute_force(metric, mode, layout, dtype_name, device):
    x, lx, unit, kwargs, brute, tol = mining_case(metric, mode, layout, dtype_name)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, tol)
    check_batch_hard(reference.batch_hard(x, lx, unit, **kwargs), brute, tol)


@pytest.mark.parametrize("k", [1, 7, 50, None], ids=["k1", "k7", "k50", "kall"])
@pytest.mark.parametrize(
    "mode,m,n", [("batch", 70, None), ("ref", 70, 45), ("ref", 9, 230)], ids=["batch70", "ref70x45", "ref9x230"]
)
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
@pytest.mark.multithreaded
def test_mining_across_many_tiles(metric, mode, m, n, k, device):
    """Sizes that span several PDDM tiles of the CPU (sides of 32 pairs at these widths; 9 x 230 is
    1 x 3 tiles of 9 x 113 pairs), so per-tile heaps and reductions are merged. A Euclidean CPU tile
    holds 128 x 128 pairs: these are one Euclidean tile there (tests/test_tile_edges.py crosses
    those edges)."""
    rows, cols = tile_shapes("cpu", torch.float32, D, H, C, m, n).pddm
    assert m > rows or (n or m) > cols
    x, lx, unit, kwargs, brute, tol = mining_case(metric, mode, "random", "f32", m=m, n=n or m, seed=11)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs), brute, k, tol)
    if k == 1:
        check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, tol)


@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
@pytest.mark.parametrize("mode", ["batch", "ref"])
def test_mine_hard_matches_reference_oracle(metric, mode, device):
    x, lx, unit, kwargs, brute, tol = mining_case(metric, mode, "unbalanced", "f64")
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    for k in (1, 3, None):
        fused = pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs)
        oracle = reference.mine_hard(x, lx, unit, k=k, **kwargs)
        for got, want in zip(fused[:4], oracle[:4]):  # random float64 data: no ties, same indices
            assert torch.equal(got, want)
        torch.testing.assert_close(fused.scores, oracle.scores, rtol=1e-10, atol=1e-10)
    for got, want in zip(pddm_ext.batch_hard(x, lx, unit, **kwargs), reference.batch_hard(x, lx, unit, **kwargs)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- exact ties


def duplicated_case(metric, mode):
    """Every row appears twice (rows t and t + half), so every score has an exact twin."""
    unit = make_unit(D, H, C, seed=5) if metric == "pddm" else None
    params = None if unit is None else ref_params(unit)
    z = randn(20, D, seed=6)
    lz = make_labels("unbalanced", 20, 7)
    x, lx = torch.cat([z, z]), torch.cat([lz, lz])
    if mode == "batch":
        y, ly, kwargs = x, lx, {}
    else:
        w = randn(15, D, seed=8)
        lw = make_labels("random", 15, 9)
        y, ly = torch.cat([w, w]), torch.cat([lw, lw])
        kwargs = dict(ref_emb=y, ref_labels=ly)
    kwargs["metric"] = metric
    brute = Brute(brute_scores(x, y, params, metric), lx.tolist(), ly.tolist(), mode == "batch", equal_rows(x, y))
    return x, lx, unit, kwargs, brute


@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_duplicate_rows_within_tolerance(metric, mode, device):
    x, lx, unit, kwargs, brute = duplicated_case(metric, mode)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    for k in (1, 3, 10, None):
        check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs), brute, k, MINING_TOL[torch.float64])
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, MINING_TOL[torch.float64])


@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_exact_ties_go_to_smallest_index(metric, mode, device):
    """Duplicated rows make ties exact (the pairs are the same two vectors): docs/design.md#ties-and-tolerance says the
    smallest index wins and pairs are ordered by (i, r), so the brute force must be reproduced
    exactly, not just within tolerance."""
    x, lx, unit, kwargs, brute = duplicated_case(metric, mode)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    for k in (1, 3, 10, None):
        q = pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs)
        got = list(zip(*(t.tolist() for t in q[:4])))
        assert got == brute.quadruplets(k), f"k={k}"
    a, p, n = pddm_ext.batch_hard(x, lx, unit, **kwargs)
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == brute.batch_hard()


def test_tie_between_duplicate_negatives_small():
    """A hand-checkable tie: rows 1 and 3 are the same point, both negatives of row 0."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0])
    a, p, n = pddm_ext.batch_hard(x, labels)  # euclidean
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert p.tolist() == [2, 3, 0, 1, 2]
    # row 0: negatives 1 and 3 tie at distance 1 -> 1; row 2: 1 and 3 tie -> 1; row 4: tie -> 1
    assert n.tolist() == [1, 0, 1, 0, 1]
    q = pddm_ext.mine_hard(x, labels, k=None)
    # positive pairs by ascending S = -dist^2: (0,2): -50, (2,4): -29, (0,4): -9, (1,3): 0
    assert q.anchor.tolist() == [0, 2, 0, 1]
    assert q.positive.tolist() == [2, 4, 4, 3]
    assert q.anchor_negative.tolist() == [1, 1, 1, 0]
    # hardest_negative_of_ref: r=2 -> argmax over {1, 3} tie -> 1; r=4 -> 1; r=3 -> argmax over {0,2,4}: 0
    assert q.positive_negative.tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(q.scores[:, 0], torch.tensor([-50.0, -29.0, -9.0, 0.0], dtype=torch.float64))


# --------------------------------------------------------------------------- self copies (reference mode)


def tiny(dtype):
    """A normal number whose square underflows to 0 in ``dtype``."""
    return 1e-30 if dtype == torch.float32 else 1e-170


def self_copy_case(metric, dtype_name, m, n, seed):
    """Reference mode against references that hold copies of the queries (docs/design.md#mining, the
    self-copy rule): half of the queries copied in a shuffled order, one copy with another label (a
    negative, which stays one), one copy with -0.0 where its query has +0.0 (equal rows), one row
    that differs from its query by ``tiny`` in one feature (the squared difference underflows, so
    the kernels' gap is 0, but the rows differ: a positive pair), a query duplicated in the batch (so
    the copy of one also equals the other) and random rows."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    unit = make_unit(D, H, C, dtype=dtype, seed=seed) if metric == "pddm" else None
    params = None if unit is None else ref_params(unit)
    x = torch.randn(m, D, generator=g, dtype=dtype)
    x[:, 0] = 0.0
    lx = torch.randint(0, 3, (m,), generator=g)
    x[1], lx[1] = x[0], lx[0]
    copies = torch.randperm(m, generator=g)[: (m + 1) // 2]
    extra = n - len(copies) - 1
    y = torch.cat([x[copies], x[copies[:1]], torch.randn(extra, D, generator=g, dtype=dtype)])
    ly = torch.cat([lx[copies], lx[copies[:1]], torch.randint(0, 3, (extra,), generator=g)])
    y[0, 0] = -0.0
    y[len(copies), 0] = tiny(dtype)  # the second copy of copies[0]: not equal any more
    ly[1] = (ly[1] + 1) % 3  # a copy with another label
    brute = Brute(brute_scores(x, y, params, metric), lx.tolist(), ly.tolist(), False, equal_rows(x, y))
    return x, lx, y, ly, unit, brute, MINING_TOL[dtype], (int(copies[0]), len(copies))


@pytest.mark.parametrize("m,n", [(7, 11), (37, 53)], ids=["7x11", "37x53"])
@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_reference_mode_never_pairs_a_query_with_its_copy(metric, dtype_name, m, n, device):
    x, lx, y, ly, unit, brute, tol, tiny_pair = self_copy_case(metric, dtype_name, m, n, seed=m + n)
    same = [(i, r) for i in range(m) for r in range(n) if brute.equal[i][r] and brute.lx[i] == brute.ly[r]]
    assert len(same) >= (m + 1) // 2 - 1  # copies to leave out (one copy has another label)
    assert brute.positive(*tiny_pair)  # differs by a squared difference that underflows: still a positive
    kwargs = dict(ref_emb=y, ref_labels=ly, metric=metric)
    x, lx, unit, kwargs = on_device(device, x, lx, unit, kwargs)
    for k in (1, 3, None):
        for q in (pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs), reference.mine_hard(x, lx, unit, k=k, **kwargs)):
            check_quadruplets(q, brute, k, tol)
    for result in (pddm_ext.batch_hard(x, lx, unit, **kwargs), reference.batch_hard(x, lx, unit, **kwargs)):
        check_batch_hard(result, brute, tol)


# --------------------------------------------------------------------------- structure


def test_skipping_is_all_or_nothing(device):
    """Reference mode, all references share one label: positives exist but no negative -> empty."""
    x = randn(6, D, seed=1, device=device)
    lx = torch.tensor([0, 0, 1, 1, 2, 0], device=device)
    y = randn(5, D, seed=2, device=device)
    ly = torch.zeros(5, dtype=torch.int64, device=device)
    q = pddm_ext.mine_hard(x, lx, k=None, ref_emb=y, ref_labels=ly)
    assert q.anchor.numel() == 0 and q.scores.shape == (0, 3)
    a, p, n = pddm_ext.batch_hard(x, lx, ref_emb=y, ref_labels=ly)
    assert a.numel() == p.numel() == n.numel() == 0


@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.int64)], ids=["distinct", "one"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_empty_results_are_empty_not_errors(labels, metric, device):
    labels = labels.to(device)
    unit = make_unit(D, seed=1, device=device) if metric == "pddm" else None
    x = randn(6, D, seed=1, device=device)
    for k in (1, None):
        q = pddm_ext.mine_hard(x, labels, unit, k=k, metric=metric)
        assert all(t.shape == (0,) and t.dtype == torch.int64 for t in q[:4])
        assert q.scores.shape == (0, 3)
        a, p, n = q.as_triplets()
        assert a.shape == p.shape == n.shape == (0,)
    a, p, n = pddm_ext.batch_hard(x, labels, unit, metric=metric)
    assert a.shape == p.shape == n.shape == (0,)
    # a single row has no pair at all
    q = pddm_ext.mine_hard(x[:1], labels[:1], unit, metric=metric)
    assert q.anchor.numel() == 0


def test_as_triplets_batch_mode():
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "batch", "unbalanced", "f64")
    q = pddm_ext.mine_hard(x, lx, unit, k=None, **kwargs)
    a, p, n = q.as_triplets()
    nq = q.anchor.numel()
    assert nq > 0 and a.shape == p.shape == n.shape == (2 * nq,)
    assert torch.equal(a, torch.cat([q.anchor, q.positive]))
    assert torch.equal(p, torch.cat([q.positive, q.anchor]))
    assert torch.equal(n, torch.cat([q.anchor_negative, q.positive_negative]))
    assert (lx[a] == lx[p]).all() and (a != p).all() and (lx[a] != lx[n]).all()


def test_as_triplets_reference_mode():
    x, lx, unit, kwargs, brute, tol = mining_case("euclidean", "ref", "pairs", "f64")
    ly = kwargs["ref_labels"]
    q = pddm_ext.mine_hard(x, lx, unit, k=None, **kwargs)
    a, p, n = q.as_triplets()
    assert q.anchor.numel() > 0 and a.shape == p.shape == n.shape == q.anchor.shape
    assert torch.equal(a, q.anchor) and torch.equal(p, q.positive) and torch.equal(n, q.anchor_negative)
    assert (lx[a] == ly[p]).all() and (lx[a] != ly[n]).all()


def test_k_beyond_pair_count_keeps_all():
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "batch", "pairs", "f64")
    everything = pddm_ext.mine_hard(x, lx, unit, k=None, **kwargs)
    assert everything.anchor.numel() == len(brute.sorted_positive_pairs) == 12
    big = pddm_ext.mine_hard(x, lx, unit, k=10_000, **kwargs)
    assert big.batch_mode == everything.batch_mode
    for got, want in zip(big[:5], everything[:5]):
        assert torch.equal(got, want)


def test_default_metric():
    """Without a unit the metric is euclidean; with one it is pddm."""
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "batch", "random", "f64")
    q_default = pddm_ext.mine_hard(x, lx, unit, k=None)
    q_pddm = pddm_ext.mine_hard(x, lx, unit, k=None, metric="pddm")
    assert all(torch.equal(a, b) for a, b in zip(q_default[:5], q_pddm[:5])) and q_default.batch_mode == q_pddm.batch_mode
    q_none = pddm_ext.mine_hard(x, lx, k=None)
    q_euc = pddm_ext.mine_hard(x, lx, unit, k=None, metric="euclidean")
    assert all(torch.equal(a, b) for a, b in zip(q_none[:5], q_euc[:5])) and q_none.batch_mode == q_euc.batch_mode


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_label_dtypes(dtype):
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "ref", "random", "f64")
    ly = kwargs["ref_labels"]
    want = pddm_ext.mine_hard(x, lx, unit, k=None, **kwargs)
    got = pddm_ext.mine_hard(x, lx.to(dtype), unit, k=None, ref_emb=kwargs["ref_emb"], ref_labels=ly.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(got[:5], want[:5])) and got.batch_mode == want.batch_mode
    bh = pddm_ext.batch_hard(x, lx.to(dtype), unit, ref_emb=kwargs["ref_emb"], ref_labels=ly.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(bh, pddm_ext.batch_hard(x, lx, unit, **kwargs)))


def test_mining_does_not_track_gradients():
    unit = make_unit(D, seed=2)
    x = randn(10, D, seed=3).requires_grad_()
    labels = torch.arange(5).repeat(2)
    q = pddm_ext.mine_hard(x, labels, unit, k=None)
    assert not q.scores.requires_grad
    assert x.grad is None


@cpu_kernels_only
def test_half_embeddings_mine_like_float32():
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "batch", "pairs", "f32")
    xh = x.to(torch.bfloat16)
    q = pddm_ext.mine_hard(xh, lx, unit, k=None)
    assert q.scores.dtype == torch.float32
    want = pddm_ext.mine_hard(xh.float(), lx, unit, k=None)
    assert all(torch.equal(a, b) for a, b in zip(q[:5], want[:5])) and q.batch_mode == want.batch_mode


# --------------------------------------------------------------------------- pytorch-metric-learning


@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("layout", ["pairs", "unbalanced", "random"])
def test_batch_hard_agrees_with_pml_batch_hard_miner(layout, dtype_name, mode):
    """metric="euclidean" on L2-normalised embeddings is BatchHardMiner's rule (docs/design.md#mining). The two
    may break near-ties differently, so the chosen positives/negatives are compared by distance."""
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    dtype = DTYPES[dtype_name]
    tol = MINING_TOL[dtype]
    x = torch.nn.functional.normalize(randn(32, 8, dtype=dtype, seed=21), dim=1)
    lx = make_labels(layout, 32, 22)
    if mode == "batch":
        y, ly, kwargs, pml_args = x, lx, {}, ()
    else:
        y = torch.nn.functional.normalize(randn(27, 8, dtype=dtype, seed=23), dim=1)
        ly = make_labels(layout, 27, 24)
        kwargs, pml_args = dict(ref_emb=y, ref_labels=ly), (y, ly)
    a, p, n = pddm_ext.batch_hard(x, lx, metric="euclidean", **kwargs)
    pa, pp, pn = miners.BatchHardMiner()(x, lx, *pml_args)
    assert a.numel() > 0
    assert a.tolist() == pa.tolist()
    sq = lambda i, r: ((x[i].double() - y[r].double()) ** 2).sum(-1)  # noqa: E731
    # hardest positive = farthest positive, hardest negative = nearest negative; on the unit sphere
    # |S| = ||a - b||^2 <= 4, so the tol * (1 + |best|) of docs/design.md#ties-and-tolerance is at most 5 * tol
    torch.testing.assert_close(sq(a, p), sq(pa, pp), rtol=0, atol=tol * 5)
    torch.testing.assert_close(sq(a, n), sq(pa, pn), rtol=0, atol=tol * 5)
    assert (lx[a] == ly[p]).all() and (lx[a] != ly[n]).all()


# --------------------------------------------------------------------------- dtypes and copies


def test_mixed_dtypes_compute_in_float64():
    """float32 queries against float64 references (and a float32 unit) are mined in float64."""
    x, lx, unit, kwargs, brute, tol = mining_case("pddm", "ref", "random", "f64")
    unit32 = make_unit(D, H, C, dtype=torch.float32, seed=0)
    x32 = x.float()
    q = pddm_ext.mine_hard(x32, lx, unit32, k=None, **kwargs)
    assert q.scores.dtype == torch.float64
    brute64 = Brute(brute_scores(x32, kwargs["ref_emb"], ref_params(unit32), "pddm"), lx.tolist(),
                    kwargs["ref_labels"].tolist(), batch=False)
    check_quadruplets(q, brute64, None, MINING_TOL[torch.float64])


def test_quadruplets_copy_and_pickle_keep_the_mode():
    import copy
    import pickle

    x, lx, unit, kwargs, brute, tol = mining_case("euclidean", "ref", "pairs", "f64")
    q = pddm_ext.mine_hard(x, lx, k=None, **kwargs)
    assert not q.batch_mode
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert clone.batch_mode is False
        for got, want in zip(clone.as_triplets(), q.as_triplets()):
            assert torch.equal(got, want)
    a, p, n = q.as_triplets()
    assert a.shape == q.anchor.shape  # reference mode: q triplets, not 2q


# --------------------------------------------------------------------------- on every device: ops.mine's slots


def reference_slots(x, lx, y, ly, params, metric):
    """Full score matrix (float64) and the masks of docs/design.md#mining (reference mode: the
    same-label pairs of equal rows are no positive pairs)."""
    batch = y is None
    yy, lyy = (x, lx) if batch else (y, ly)
    if metric == "euclidean":
        S = reference.euclidean_scores(x.double(), yy.double())
    else:
        S = reference.pddm_scores(x.double(), None if batch else y.double(), [p.double() for p in params])
    same = lx[:, None] == lyy[None, :]
    positive, negative = same.clone(), ~same
    if batch:
        positive.fill_diagonal_(False)
    else:
        positive &= ~(x[:, None, :] == y[None, :, :]).all(-1)
    return S, positive, negative


def assert_slot(idx, S, mask, maximize, tol, what):
    """idx[row] is -1 iff the row has no candidate, else a candidate within tol of the optimum."""
    masked = torch.where(mask, S, torch.tensor(-float("inf") if maximize else float("inf"), dtype=S.dtype, device=S.device))
    best = masked.max(1).values if maximize else masked.min(1).values
    has = mask.any(1)
    assert torch.equal(idx >= 0, has), f"{what}: -1 pattern differs"
    rows = has.nonzero().flatten()
    if rows.numel() == 0:
        return
    j = idx[rows]
    assert bool(mask[rows, j].all()), f"{what}: index is not a candidate"
    got = S[rows, j]
    assert bool(((got - best[rows]).abs() <= tol * (1 + best[rows].abs())).all()), f"{what}: not optimal"


def check_mining(x, lx, y, ly, unit, metric, k):
    batch = y is None
    params = None if metric == "euclidean" else params_of(unit)
    dtype = x.dtype
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    out = pddm_ops.mine(x, lx, y, ly, params, -1 if k is None else k)
    hp, hp_s, hn, hn_s, hnr, hnr_s, pi, pr, ps = out
    S, positive, negative = reference_slots(x, lx, y, ly, params, metric)
    assert_slot(hp, S, positive, False, tol, "hardest_positive")
    assert_slot(hn, S, negative, True, tol, "hardest_negative")
    assert_slot(hnr, S.T, negative.T, True, tol, "hardest_negative_of_ref")
    for idx, s, M in ((hp, hp_s, S), (hn, hn_s, S), (hnr, hnr_s, S.T)):
        rows = (idx >= 0).nonzero().flatten()
        if rows.numel():
            want = M[rows, idx[rows]]
            assert bool(((s[rows].double() - want).abs() <= tol * (1 + want.abs())).all())
    # The k lowest positive pairs: the right count, valid, distinct, in the order of docs/design.md#mining, of their own
    # scores, and none better than the reference's k-th.
    pos = positive.triu(1) if batch else positive
    n_pos = int(pos.sum())
    want_q = 0 if k == 0 else (n_pos if k is None else min(k, n_pos))
    assert pi.numel() == want_q
    if want_q:
        assert bool(pos[pi, pr].all())
        assert len(set(zip(pi.tolist(), pr.tolist()))) == want_q
        keys = list(zip(ps.tolist(), pi.tolist(), pr.tolist()))
        assert keys == sorted(keys)
        kth = torch.sort(S[pos]).values[want_q - 1]
        assert bool((S[pi, pr] <= kth + tol * (1 + kth.abs())).all())
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_mining_matches_reference_and_cpu(seed, metric, device):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if seed % 2 else torch.float32
    batch = seed % 3 != 0
    m = int(torch.randint(1, 70, (1,), generator=g))
    n = int(torch.randint(1, 90, (1,), generator=g))
    d = int(torch.randint(1, 40, (1,), generator=g))
    classes = int(torch.randint(1, 6, (1,), generator=g))
    k = [None, 0, 1, 3, 1000][seed % 5]
    x = torch.randn(m, d, generator=g, dtype=dtype)
    if m > 3:
        x[3] = x[2]  # exact ties: smallest index wins
    y = None if batch else torch.randn(n, d, generator=g, dtype=dtype)
    lx = torch.randint(0, classes, (m,), generator=g)
    ly = None if batch else torch.randint(0, classes, (n,), generator=g)
    unit = make_unit(d, dtype=dtype, device="cpu", seed=seed)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = check_mining(to(x), to(lx), to(y), to(ly), unit.to(device), metric, k)
    if EMULATED:
        return  # the emulation build has no CPU kernels to compare with (check_mining used the reference)
    cpu = pddm_ops.mine(x, lx, y, ly, None if metric == "euclidean" else params_of(unit.cpu()), -1 if k is None else k)
    # Same -1 pattern and, where the CPU's choice is unique up to tolerance, the same index.
    for a, b in zip(out[:6:2], cpu[:6:2]):
        assert torch.equal(a.cpu() >= 0, b >= 0)
    assert out[6].numel() == cpu[6].numel()


@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_public_mining_api_matches_reference(metric, device):
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(48, 16, device=device), dim=1)
    labels = torch.arange(12, device=device).repeat_interleave(4)
    unit = make_unit(16, device=device, dtype=torch.float32) if metric == "pddm" else None
    q = pddm_ext.mine_hard(emb, labels, unit, k=5, metric=metric)
    r = reference.mine_hard(emb, labels, unit, k=5, metric=metric)
    assert q.anchor.device.type == torch.device(device).type and q.anchor.dtype == torch.int64
    assert q.anchor.numel() == r.anchor.numel()
    assert rel_err(q.scores[:, 0], r.scores[:, 0]) < 1e-4
    a, p, n = pddm_ext.batch_hard(emb, labels, unit, metric=metric)
    ra, rp, rn = reference.batch_hard(emb, labels, unit, metric=metric)
    assert torch.equal(a, ra)


@pytest.mark.parametrize("m,n", [(41, 67), (20, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_reference_mode_leaves_out_a_querys_copy(metric, dtype, m, n, device):
    """docs/design.md#mining's self-copy rule in the kernels: references that hold the queries (shuffled,
    one with -0.0 for +0.0, one with another label) are no positives of their queries; a row that
    differs by a squared difference that underflows still is one. 41 x 67 spans several tiles of both
    metrics, 20 x 30 is one Euclidean tile (one block); k selects the append buffer (every pair, or
    more than the blocks' heaps would hold) and the per-block heaps (k < pairs by label, k x blocks <=
    pairs by label), with k large enough that the copies would enter the heaps without the rule."""
    g = torch.Generator().manual_seed(7)
    d = 9
    tiny = 1e-30 if dtype == torch.float32 else 1e-170
    x = torch.randn(m, d, generator=g, dtype=dtype)
    x[:, 0] = 0.0
    lx = torch.randint(0, 3, (m,), generator=g)
    copies = torch.randperm(m, generator=g)
    y = torch.cat([x[copies], torch.randn(n - m, d, generator=g, dtype=dtype)])
    ly = torch.cat([lx[copies], torch.randint(0, 3, (n - m,), generator=g)])
    y[0, 0], y[1, 0] = -0.0, tiny
    ly[2] = (ly[2] + 1) % 3
    unit = make_unit(d, 11, 6, dtype=dtype, device=device, seed=4)
    to = lambda t: t.to(device)  # noqa: E731
    _, positive, _ = reference_slots(x, lx, y, ly, None, "euclidean")
    excluded = torch.zeros(m, n, dtype=torch.bool)
    excluded[copies, torch.arange(m)] = True  # query copies[r] against its copy y[r]
    excluded &= lx[:, None] == ly[None, :]
    excluded[copies[1], 1] = False  # y[1] differs from its query by tiny
    assert int(excluded.sum()) == m - 2 and not positive[excluded].any() and positive[copies[1], 1]
    by_label = int((lx[:, None] == ly[None, :]).sum())  # the kernels' count of positive pairs, by label
    for k in (1, 5, None, by_label // 16, by_label - 1):
        out = check_mining(to(x), to(lx), to(y), to(ly), unit, metric, k)
        hp, pi, pr = out[0].cpu(), out[6].cpu(), out[7].cpu()
        rows = (hp >= 0).nonzero().flatten()
        assert not excluded[rows, hp[rows]].any() and not excluded[pi, pr].any()


def test_reference_mode_bank_much_larger_than_queries(device):
    bank = 20000 if device == "cuda" else 2003  # the emulation runs one block at a time on one core
    unit = make_unit(32, 32, 32, seed=3, device=device, dtype=torch.float32)
    x = torch.randn(5, 32, device=device)
    y = torch.randn(bank, 32, device=device)
    lx = torch.arange(5, device=device)
    ly = torch.randint(0, 50, (bank,), device=device)
    check_mining(x, lx, y, ly, unit, "pddm", 7)
    check_mining(x, lx, y, ly, unit, "euclidean", None)


def nan_rule_best(S, mask, maximize):
    """The NaN rule of pddm_common.h by brute force: the best non-NaN candidate (ties: smallest
    index); a NaN only when every candidate is NaN (then the smallest index); -1 without candidates."""
    out = []
    for row, cand in zip(S.tolist(), mask.tolist()):
        idx = [j for j, c in enumerate(cand) if c]
        finite = [j for j in idx if row[j] == row[j]]
        if not idx:
            out.append(-1)
        elif not finite:
            out.append(idx[0])
        else:
            best = (max if maximize else min)(row[j] for j in finite)
            out.append(min(j for j in finite if row[j] == best))
    return out


def check_nan_rule(device, dtype, m=45, n=53):
    """Mining where every PDDM score is NaN (b_s = NaN; only reachable through torch.ops: the API
    rejects NaN): each slot gets its smallest candidate index, the pairs come in (i, r) order. The
    packed float keys of the GPU, the locked float64 path and the CPU's merges of per-thread partial
    results must all follow the rule of pddm_common.h, whatever order the candidates arrive in."""
    g = torch.Generator().manual_seed(5)
    unit = make_unit(6, 5, 4, dtype=dtype, device="cpu", seed=5)
    params = [t.clone() for t in params_of(unit)]
    params[-1].fill_(float("nan"))  # b_s
    x = torch.randn(m, 6, generator=g, dtype=dtype)
    y = torch.randn(n, 6, generator=g, dtype=dtype)
    lx = torch.randint(0, 3, (m,), generator=g)
    ly = torch.randint(0, 3, (n,), generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    S = torch.full((m, n), float("nan"), dtype=torch.float64)
    same = lx[:, None] == ly[None, :]
    out = torch.ops.pddm_ext.mine_pddm(to(x), to(lx), to(y), to(ly), *map(to, params), 4)
    assert bool(out[1].isnan().all()) and bool(out[3].isnan().all())
    assert out[0].tolist() == nan_rule_best(S, same, False)
    assert out[2].tolist() == nan_rule_best(S, ~same, True)
    assert out[4].tolist() == nan_rule_best(S.T, ~same.T, True)
    want = same.nonzero().tolist()[:4]  # all NaN: (i, r) order
    assert [list(t) for t in zip(out[6].tolist(), out[7].tolist())] == want
    # batch mode: the pairs i < r
    out = torch.ops.pddm_ext.mine_pddm(to(x), to(lx), None, None, *map(to, params), 3)
    same_b = lx[:, None] == lx[None, :]
    pos_b = same_b & ~torch.eye(m, dtype=torch.bool)
    Sb = torch.full((m, m), float("nan"), dtype=torch.float64)
    assert out[0].tolist() == nan_rule_best(Sb, pos_b, False)
    assert out[2].tolist() == nan_rule_best(Sb, ~same_b, True)
    assert [list(t) for t in zip(out[6].tolist(), out[7].tolist())] == pos_b.triu(1).nonzero().tolist()[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_scores_follow_the_rule_of_pddm_common(dtype, device):
    check_nan_rule(device, dtype)


@cpu_kernels_only
@pytest.mark.multithreaded
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_scores_follow_the_rule_of_pddm_common_cpu_kernels(dtype):
    check_nan_rule("cpu", dtype, m=300, n=280)  # many tiles: per-thread partial results merged


def test_bank_mining_checked_chunk_by_chunk(device):
    """The check of the 2^31-pair test below, on a bank small enough for every backend (the emulation
    included), so that the check itself runs in CI: a bank of 3001 rows in chunks of 512."""
    x, lx, y, ly, params = bank_case(16, 3001, 4, device, classes=40)
    check_bank_mining(x, lx, y, ly, params, 3, 512)


def test_bad_input_errors(device):
    unit = make_unit(8, device=device, dtype=torch.float32)
    p = params_of(unit)
    x = torch.randn(5, 8, device=device)
    with pytest.raises(ValueError):
        pddm_ext.pddm_scores(torch.randn(5, 7, device=device), None, *p)  # d mismatch
    with pytest.raises(ValueError):
        pddm_ext.pddm_scores(torch.empty(0, 8, device=device), None, *p)  # empty
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pddm_ext.pddm_scores(bad, None, *p)
    with pytest.raises(ValueError):
        pddm_ext.mine_hard(x, torch.arange(4, device=device), unit)  # labels length
    with pytest.raises(ValueError):
        pddm_ext.mine_hard(x, torch.arange(5, device=device), unit, k=0)
    with pytest.raises(ValueError):
        pddm_ext.mine_hard(x, torch.rand(5, device=device), unit)  # float labels


def test_no_positive_or_no_negative_is_empty_not_an_error(device):
    unit = make_unit(8, device=device, dtype=torch.float32)
    x = torch.randn(6, 8, device=device)
    q = pddm_ext.mine_hard(x, torch.arange(6, device=device), unit)  # no positive pair
    assert q.anchor.numel() == 0
    q = pddm_ext.mine_hard(x, torch.zeros(6, dtype=torch.long, device=device), unit)  # no negative
    assert q.anchor.numel() == 0
