"""All-pairs PDDM scores (docs/design.md#the-pddm-unit, #public-api): the fused kernel against ``pddm_ext.reference``.

The reference always runs in float64 on the same input values (half and float32 inputs are upcast
exactly), so the difference measured is the fused kernel's own rounding.
Tolerances: float64 1e-10 abs/rel; float32 1e-4 relative to the score scale (float32 eps is 6e-8:
a tile's sums of d, h and 2h terms and the normalisations stay far below that bound).
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from pddm_ext._tiles import tile_shapes
from helpers import (EMULATED, HALF, ODD_SHAPES, TOL, assert_scores_close, cpu_kernels_only, make_unit, params_of, randn,
                     ref_params, rel_err)


# (m, n, d, h, c); n=None is batch mode. The CPU's batch-mode tiles are 32 x 32 pairs for these small
# widths (17 x 17 for d = h = c = 128 in float32, 12 x 12 in float64); in reference mode a tile has
# min(side, m) rows and about side^2 pairs (csrc/cpu/tile_shapes.h, reported by pddm_ext._tiles):
# sizes straddle them on purpose (test_shapes_straddle_the_cpu_tiles keeps this true).
SHAPES = [
    (1, None, 1, 1, 1),
    (1, None, 5, 3, 2),
    (2, None, 1, 4, 3),
    (2, None, 3, 3, 3),
    (1, 1, 4, 4, 4),
    (1, 7, 3, 5, 2),
    (7, 1, 3, 2, 5),
    (2, 3, 1, 2, 2),
    (17, None, 8, 6, 5),
    (33, None, 7, 9, 4),
    (33, 17, 5, 3, 7),
    (65, None, 6, 5, 6),
    (17, 65, 4, 8, 3),
    (65, 33, 1, 3, 4),
    (40, None, 128, 128, 128),
    (20, 37, 128, 128, 128),
]


# ODD_SHAPES (tests/helpers.py: sizes the CUDA kernels find awkward) in both modes, where not above.
SHAPES += [s for m, n, d, h, c in ODD_SHAPES for s in ((m, None, d, h, c), (m, n, d, h, c)) if s not in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m,n,d,h,c", SHAPES, ids=[f"m{s[0]}n{s[1]}d{s[2]}h{s[3]}c{s[4]}" for s in SHAPES])
def test_scores_match_reference(m, n, d, h, c, dtype, device):
    """Shape, dtype and values against the reference (element by element, and the largest error against the
    largest score: rel_err within TOL), with a zero difference (x[1] = x[0]: normalize(0) = 0); batch mode
    exactly symmetric."""
    unit = make_unit(d, h, c, dtype=dtype, seed=m * 1000 + d, device=device)
    x = randn(m, d, dtype=dtype, seed=1, device=device)
    if m > 2:
        x[1] = x[0]
    y = None if n is None else randn(n, d, dtype=dtype, seed=2, device=device)
    S = unit(x, y)
    assert S.shape == (m, m if n is None else n)
    assert S.dtype == dtype
    S_ref = reference.pddm_scores(x.double(), None if y is None else y.double(), ref_params(unit))
    assert_scores_close(S, S_ref, dtype)
    assert rel_err(S, S_ref) < TOL[dtype]  # the largest error against the largest score, too
    if n is None:
        assert torch.equal(S, S.T)


def test_shapes_straddle_the_cpu_tiles():
    """The tile sides the comment above SHAPES names (small widths: 32; d = h = c = 128: 17 in float32, 12 in
    float64), and batch sizes over more than one tile of each (the ODD_SHAPES added after them have tiles of
    their own widths)."""
    for dtype, wide in ((torch.float32, 17), (torch.float64, 12)):
        sides = {}
        for m, n, d, h, c in SHAPES:
            named = d == h == c == 128 or max(d, h, c) <= 9
            if n is None and named:
                rows, cols = tile_shapes("cpu", dtype, d, h, c, m).pddm
                assert rows == cols == (wide if d == 128 else 32), (m, d, dtype)
                sides[rows] = max(sides.get(rows, 0), m)
        assert set(sides) == {32, wide} and all(m > rows for rows, m in sides.items()), sides


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.multithreaded
def test_scores_many_tiles(dtype, device):
    """m = 300 crosses a 10 x 10 grid of the CPU's tiles (32-pair sides at these widths). The emulated device
    runs m = 100, n = 45 (13 x 13 and 13 x 6 of the CUDA kernels' 8 x 8 tiles), a third of the time."""
    m, n = (100, 45) if EMULATED else (300, 130)
    unit = make_unit(6, 5, 4, dtype=dtype, seed=3, device=device)
    x = randn(m, 6, dtype=dtype, seed=4, device=device)
    S_ref = reference.pddm_scores(x.double(), None, ref_params(unit))
    assert_scores_close(unit(x), S_ref, dtype)
    y = randn(n, 6, dtype=dtype, seed=5, device=device)
    S_ref = reference.pddm_scores(x.double(), y.double(), ref_params(unit))
    assert_scores_close(unit(x, y), S_ref, dtype)


def test_functional_equals_module(device):
    unit = make_unit(5, 4, 3, device=device)
    x, y = randn(9, 5, seed=1, device=device), randn(4, 5, seed=2, device=device)
    torch.testing.assert_close(pddm_ext.pddm_scores(x, y, *unit.params()), unit(x, y), rtol=0, atol=0)
    torch.testing.assert_close(pddm_ext.pddm_scores(x, None, *unit.params()), unit(x), rtol=0, atol=0)


def test_default_widths():
    unit = pddm_ext.PDDM(6)
    assert unit.W_u.shape == (6, 6) and unit.W_c.shape == (6, 12) and unit.w_s.shape == (6,)
    assert unit.b_s.shape == ()
    unit = pddm_ext.PDDM(6, 4)
    assert unit.W_c.shape == (4, 8)
    assert [name for name, _ in unit.named_parameters()] == list(reference.PARAM_NAMES)


@pytest.mark.parametrize("m", [1, 2, 17, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_batch_mode_exactly_symmetric(m, dtype, device):
    unit = make_unit(7, 6, 5, dtype=dtype, seed=m, device=device)
    S = unit(randn(m, 7, dtype=dtype, seed=m, device=device))
    assert torch.equal(S, S.T)


def test_batch_mode_equals_reference_mode_on_same_rows(device):
    unit = make_unit(5, 4, 6, device=device)
    x = randn(37, 5, seed=3, device=device)
    torch.testing.assert_close(unit(x), unit(x, x.clone()), rtol=1e-12, atol=1e-12)


def test_diagonal_pair_is_well_defined(device):
    """S(a, a): u = 0 and normalize(0) = 0, so u' = relu(b_u) (docs/design.md#the-pddm-unit)."""
    unit = make_unit(4, 3, 3, device=device)
    x = randn(5, 4, seed=1, device=device)
    S = unit(x)
    assert torch.isfinite(S).all()
    S_ref = reference.pair_scores(x, x, ref_params(unit))
    torch.testing.assert_close(torch.diagonal(S), S_ref, rtol=1e-10, atol=1e-10)


def test_duplicate_rows_give_identical_scores(device):
    unit = make_unit(6, 5, 4, device=device)
    z = randn(20, 6, seed=7, device=device)
    x = torch.cat([z, z])
    S = unit(x)
    assert torch.equal(S[:20, :20], S[20:, 20:])
    assert torch.equal(S[:20, 20:], S[20:, :20])


@cpu_kernels_only
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_half_inputs_computed_in_float32(half, batch):
    unit = make_unit(8, 6, 5, dtype=torch.float32, seed=2)
    x = randn(19, 8, dtype=torch.float32, seed=1).to(half)
    y = None if batch else randn(11, 8, dtype=torch.float32, seed=2).to(half)
    S = unit(x, y)
    assert S.dtype == torch.float32
    S_ref = reference.pddm_scores(x.double(), None if y is None else y.double(), ref_params(unit))
    assert_scores_close(S, S_ref, torch.float32)


def test_half_unit_with_float32_inputs():
    unit = make_unit(8, 6, 5, dtype=torch.float32, seed=2).to(torch.bfloat16)
    x = randn(9, 8, dtype=torch.float32, seed=1)
    S = unit(x)
    assert S.dtype == torch.float32
    assert_scores_close(S, reference.pddm_scores(x.double(), None, ref_params(unit)), torch.float32)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "ref"])
def test_float32_unit_with_float64_inputs(batch, device):
    """The compute dtype follows the inputs: a float32 unit on float64 inputs runs in float64."""
    unit = make_unit(6, 5, 4, dtype=torch.float32, seed=4, device=device)
    x = randn(21, 6, seed=1, device=device)
    y = None if batch else randn(13, 6, seed=2, device=device)
    S = unit(x, y)
    assert S.dtype == torch.float64
    assert_scores_close(S, reference.pddm_scores(x, y, ref_params(unit)), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_non_contiguous_inputs(dtype, device):
    unit = make_unit(6, 5, 4, dtype=dtype, seed=5, device=device)
    base = randn(6, 40, dtype=dtype, seed=1, device=device)
    x = base.T[:, :]  # (40, 6), transposed view
    assert not x.is_contiguous()
    y = randn(30, 12, dtype=dtype, seed=2, device=device)[::2, ::2]  # (15, 6), strided view
    assert not y.is_contiguous()
    params = list(unit.params())
    params[0] = params[0].detach().T.contiguous().T  # W_u with transposed strides
    params[4] = randn(20, 4, dtype=dtype, seed=3, device=device)[::2].T * 0.3  # W_c (c, 2h) = (4, 10), strided
    assert not params[0].is_contiguous() and not params[4].is_contiguous()
    ref = tuple(p.detach().double() for p in params)
    for a, b in ((x, None), (x, y), (y, x)):
        S = pddm_ext.pddm_scores(a, b, *params)
        S_ref = reference.pddm_scores(a.double(), None if b is None else b.double(), ref)
        assert_scores_close(S, S_ref, dtype)


def test_pair_scores_match_reference(device):
    unit = make_unit(7, 5, 6, device=device)
    a, b = randn(23, 7, seed=1, device=device), randn(23, 7, seed=2, device=device)
    s = unit.pair_scores(a, b)
    assert s.shape == (23,)
    torch.testing.assert_close(s, reference.pair_scores(a, b, unit), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pddm_ext.pair_scores(a, b, unit.params()), s, rtol=0, atol=0)
    # consistent with the all-pairs scores
    S = unit(a, b)
    torch.testing.assert_close(torch.diagonal(S), s, rtol=1e-10, atol=1e-10)


def test_scores_are_scale_invariant(device):
    """u and v enter only through normalize(), so S(t a, t b) = S(a, b) for t > 0."""
    unit = make_unit(4, 4, 4, device=device)
    x = randn(6, 4, seed=1, device=device)
    torch.testing.assert_close(unit(3 * x), unit(x), rtol=1e-12, atol=1e-12)


def test_upcast_half_inputs_compute_in_float32(device):
    """The way to keep float32 products for half data (docs/design.md#precision): upcast it. The scores
    are then float32's, within float32's tolerance of the float64 reference of the half values."""
    unit = make_unit(16, 8, 8, device=device, dtype=torch.float32)
    x = torch.randn(20, 16, device=device, dtype=torch.float16)
    S = pddm_ext.pddm_scores(x.float(), None, *params_of(unit))
    assert S.dtype == torch.float32
    want = reference.pddm_scores(x.double(), None, [p.double() for p in params_of(unit)])
    assert rel_err(S, want) < 1e-4


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_duplicate_columns_score_identically_wherever_they_sit_in_a_tile(batch, device):
    """float32 scores of duplicate rows are bitwise equal whatever their place in an 8 x 8 tile (column
    2 and column 6 of a tile are summed by different thread groups; exact ties must stay exact)."""
    unit = make_unit(24, 16, 40, device=device, dtype=torch.float32)
    x = torch.randn(19, 24, device=device)
    y = None if batch else torch.randn(21, 24, device=device)
    rows = x if batch else y
    rows[6] = rows[2]
    rows[13] = rows[2]
    rows[15] = rows[4]
    S = pddm_ext.pddm_scores(x, y, *params_of(unit))
    assert torch.equal(S[:, 6], S[:, 2]) and torch.equal(S[:, 13], S[:, 2]) and torch.equal(S[:, 15], S[:, 4])


@cpu_kernels_only
def test_cpu_computes_half_inputs_in_float32():
    """The CPU kernels compute half inputs in float32: scores, mining and the scores' backward bitwise
    those of the upcast inputs (product_dtype is accepted and checked, and changes nothing)."""
    unit = make_unit(10, 12, 9, device="cpu", dtype=torch.float32)
    p = params_of(unit)
    lx = torch.randint(0, 3, (21,))
    for dtype in HALF:
        x = torch.randn(21, 10).to(dtype)
        assert torch.equal(pddm_ext.pddm_scores(x, None, *p), pddm_ext.pddm_scores(x.float(), None, *p))
        got, want = pddm_ext.mine_hard(x, lx, unit, k=4), pddm_ext.mine_hard(x.float(), lx, unit, k=4)
        for a, b in zip(got[:5], want[:5]):
            assert torch.equal(a, b)
        G = torch.randn(21, 21)
        with_dtype = torch.ops.pddm_ext.scores_backward(G, x.float(), None, *p, [True, False, True], True, dtype)
        for a, b in zip(with_dtype, torch.ops.pddm_ext.scores_backward(G, x.float(), None, *p, [True, False, True])):
            assert torch.equal(a, b)
