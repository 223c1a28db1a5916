"""Property-based tests (hypothesis) over random shapes, labels, modes and metrics: the fused scores
and mining against ``pddm_ext.reference``, with the tolerances of test_scores / docs/design.md#ties-and-tolerance."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pddm_ext  # noqa: E402
from pddm_ext import reference  # noqa: E402
from helpers import MINING_TOL, make_unit, randn, ref_params  # noqa: E402
from test_mining import Brute, check_batch_hard, check_quadruplets  # noqa: E402

SETTINGS = dict(max_examples=30, deadline=None, database=None, derandomize=True)


@st.composite
def score_cases(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.one_of(st.none(), st.integers(1, 40)))
    d, h, c = draw(st.integers(1, 12)), draw(st.integers(1, 10)), draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return m, n, d, h, c, dtype, seed, scale


@settings(**SETTINGS)
@given(score_cases())
def test_scores_property(case):
    m, n, d, h, c, dtype, seed, scale = case
    unit = make_unit(d, h, c, dtype=dtype, seed=seed)
    x = randn(m, d, dtype=dtype, seed=seed + 1) * scale
    y = None if n is None else randn(n, d, dtype=dtype, seed=seed + 2) * scale
    S = unit(x, y)
    assert S.shape == (m, m if n is None else n) and S.dtype == dtype
    S_ref = reference.pddm_scores(x.double(), None if y is None else y.double(), ref_params(unit))
    if dtype == torch.float64:
        torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-4 * max(1.0, S_ref.abs().max().item()))
    if n is None:
        assert torch.equal(S, S.T)


@st.composite
def mining_cases(draw):
    m = draw(st.integers(1, 30))
    n = draw(st.one_of(st.none(), st.integers(1, 30)))
    classes = draw(st.integers(1, 6))
    lx = draw(st.lists(st.integers(0, classes - 1), min_size=m, max_size=m))
    ly = None if n is None else draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    metric = draw(st.sampled_from(["pddm", "euclidean"]))
    k = draw(st.sampled_from([1, 2, 5, None]))
    d = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    return m, n, lx, ly, metric, k, d, dtype, seed


def ref_scores(x, y, params, metric):
    return reference.euclidean_scores(x, y) if metric == "euclidean" else reference.pddm_scores(x, y, params)


@settings(**SETTINGS)
@given(mining_cases())
def test_mining_property(case):
    m, n, lx, ly, metric, k, d, dtype, seed = case
    unit = make_unit(d, 5, 4, dtype=dtype, seed=seed) if metric == "pddm" else None
    x = randn(m, d, dtype=dtype, seed=seed + 1)
    labels = torch.tensor(lx)
    if n is None:
        kwargs = {}
        S = ref_scores(x.double(), None, None if unit is None else ref_params(unit), metric)
        brute = Brute(S.tolist(), lx, lx, batch=True)
    else:
        y = randn(n, d, dtype=dtype, seed=seed + 2)
        kwargs = dict(ref_emb=y, ref_labels=torch.tensor(ly))
        S = ref_scores(x.double(), y.double(), None if unit is None else ref_params(unit), metric)
        brute = Brute(S.tolist(), lx, ly, batch=False)
    tol = MINING_TOL[dtype]
    q = pddm_ext.mine_hard(x, labels, unit, k=k, metric=metric, **kwargs)
    check_quadruplets(q, brute, k, tol)
    oracle = reference.mine_hard(x.double(), labels, None if unit is None else ref_params(unit), k=k,
                                 metric=metric, **{key: (v.double() if v.is_floating_point() else v)
                                                   for key, v in kwargs.items()})
    assert q.anchor.numel() == oracle.anchor.numel()
    check_batch_hard(pddm_ext.batch_hard(x, labels, unit, metric=metric, **kwargs), brute, tol)
