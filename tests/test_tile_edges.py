"""Sizes on either side of the kernels' tile edges: scores, gradients and mining against ``pddm_ext.reference``.

The fused kernels cut the (m, n) pair space into tiles (csrc/cpu/tile_shapes.h for the CPU,
csrc/cuda/smem_layout.h for the CUDA kernels and their emulation); ``pddm_ext._tiles.tile_shapes``
reports them, and the sizes below are tile - 1, tile, tile + 1 and 2 tile + 1 in rows and in columns,
whatever the tiles are. Backends: the CPU kernels ("cpu") in a CPU build, the CUDA kernels on a GPU
("cuda") in a CUDA build, and the CUDA kernels run on the CPU in the emulation build ("emulated",
docs/emulation.md), where the CPU kernels are not built.
Everything runs in float64 (scores float32 too), so that random inputs have no ties and the mined
indices must equal the reference's; the Euclidean case on small integers has many exact ties, which
every backend computes exactly, so there the smallest index must win across tiles too.
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from pddm_ext._tiles import tile_shapes
from helpers import EMULATED, HAS_CUDA

# tests/helpers.py's devices, each with the backend whose tiles its kernels use
if EMULATED:  # the CPU key runs the emulated CUDA kernels
    BACKENDS = [pytest.param(("cpu", "cuda"), id="emulated")]
else:
    BACKENDS = [pytest.param(("cpu", "cpu"), id="cpu")]
    if HAS_CUDA:
        BACKENDS.append(pytest.param(("cuda", "cuda"), id="cuda"))

D, H, C = 5, 6, 4  # small widths: the CPU's largest PDDM tile
LARGE = 1 << 20  # a size past every tile: the tile shape of a large problem


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(device of the tensors, backend whose tiles the kernels use)."""
    return request.param


def straddle(t):
    """Sizes around a tile side t: one short of it, it, one past it, one past two tiles."""
    return [s for s in (t - 1, t, t + 1, 2 * t + 1) if s >= 1]


def cases(kernel, tiles_backend, dtype, batch):
    """(m, n) pairs (n None in batch mode) whose rows and columns straddle the tiles of `kernel`
    ("pddm" or "euclidean"): the tile's rows for a large problem give the rows; in reference mode
    the columns of each m's tile give its n (the CPU widens its tiles when there are few queries)."""
    def shape(m, n):
        return getattr(tile_shapes(tiles_backend, dtype, D, H, C, m, n), kernel)

    rows, _ = shape(LARGE, None if batch else LARGE)
    if batch:
        return [(m, None) for m in straddle(rows)]
    out = []
    for j, m in enumerate(straddle(rows)):
        cols = shape(m, LARGE)[1]
        out.append((m, straddle(cols)[j]))  # rows and columns step through their edges together
    return out


def unit_on(device, dtype, seed):
    torch.manual_seed(seed)
    return pddm_ext.PDDM(D, H, C).to(device=device, dtype=dtype)


def ref_params(unit):
    return [p.detach().double() for p in unit.params()]


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_tile_shapes_report(batch, backend):
    """Batch-mode tiles are square (one triangle of them); reference-mode tiles never exceed the
    problem; bad arguments raise ValueError naming what is wrong."""
    _, tiles_backend = backend
    for dtype in (torch.float32, torch.float64):
        for m, n in ((1, 1), (7, 300), (300, 7), (LARGE, LARGE)):
            t = tile_shapes(tiles_backend, dtype, D, H, C, m, None if batch else n)
            for rows, cols in t:
                assert rows >= 1 and cols >= 1
                if batch:
                    assert rows == cols
    with pytest.raises(ValueError, match="backend"):
        tile_shapes("tpu", torch.float32, D, H, C, 4)
    with pytest.raises(ValueError, match="dtype"):
        tile_shapes(tiles_backend, torch.float16, D, H, C, 4)
    with pytest.raises(ValueError, match="m and n"):
        tile_shapes(tiles_backend, torch.float32, D, H, C, 4, 0)


@pytest.mark.skipif(not EMULATED, reason="the emulation build logs each launch's grid")
def test_emulated_kernels_launch_one_block_per_reported_tile():
    """The emulated device has 132 SMs: a problem of fewer tiles launches one block per tile, so the
    grids show the tile counts the kernels really use, which must follow from the reported shapes."""
    def tiles(rows, cols, m, n):
        rb, cb = -(-m // rows), -(-(m if n is None else n) // cols)
        return rb * (rb + 1) // 2 if n is None else rb * cb

    dtype = torch.float64
    unit = unit_on("cpu", dtype, 1)
    lx = torch.arange(40) % 3
    for m, n in ((40, None), (17, 33)):
        x = torch.randn(m, D, dtype=dtype)
        y = None if n is None else torch.randn(n, D, dtype=dtype)
        kw = {} if y is None else dict(ref_emb=y, ref_labels=torch.arange(n) % 3)
        t = tile_shapes("cuda", dtype, D, H, C, m, n)
        torch.ops.pddm_emu_test.launch_log("")  # clears the log
        pddm_ext.pddm_scores(x, y, *unit.params())
        assert torch.ops.pddm_emu_test.launch_log("scores_tile_kernel") == [tiles(*t.pddm, m, n)]
        pddm_ext.mine_hard(x, lx[:m], unit, k=2, **kw)
        # the log names a launch by the launcher's kernel expression: mine_pddm_cuda's is `mine_kernel`
        assert torch.ops.pddm_emu_test.launch_log("mine_kernel") == [tiles(*t.pddm, m, n)]
        pddm_ext.mine_hard(x, lx[:m], None, k=2, metric="euclidean", **kw)
        assert torch.ops.pddm_emu_test.launch_log("mine_euclidean_kernel") == [tiles(*t.euclidean, m, n)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_scores_and_gradients_across_tile_edges(batch, dtype, backend):
    """Every score and every gradient (x, y and the parameters, for a random upstream gradient)
    against float64 autograd of the reference, relative to the largest reference magnitude."""
    device, tiles_backend = backend
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for case, (m, n) in enumerate(cases("pddm", tiles_backend, dtype, batch)):
        unit = unit_on(device, dtype, case)
        g = torch.Generator().manual_seed(case)
        x = torch.randn(m, D, dtype=dtype, generator=g).to(device).requires_grad_()
        y = None if n is None else torch.randn(n, D, dtype=dtype, generator=g).to(device).requires_grad_()
        S = unit(x) if y is None else unit(x, y)
        G = torch.randn(S.shape, dtype=dtype, generator=g).to(device)
        inputs = [x] + ([] if y is None else [y])
        got = torch.autograd.grad((S * G).sum(), inputs + list(unit.params()))
        leaves = [t.detach().double().requires_grad_() for t in inputs + list(unit.params())]
        R = reference.pddm_scores(leaves[0], None if y is None else leaves[1], leaves[len(inputs):])
        want = torch.autograd.grad((R * G.double()).sum(), leaves)
        for name, a, b in [("S", S, R)] + list(zip(["x", "y"][: len(inputs)] + list(reference.PARAM_NAMES), got, want)):
            err = ((a.detach().double() - b.detach()).abs().max() / (1 + b.detach().abs().max())).item()
            assert err < (tol if name == "S" else 10 * tol), f"{name}: m={m}, n={n}, relative error {err:.2e}"


def assert_mined_like_reference(x, lx, unit, metric, y=None, ly=None):
    kw = {} if y is None else dict(ref_emb=y, ref_labels=ly)
    r_unit = None if unit is None else ref_params(unit)
    r_kw = {} if y is None else dict(ref_emb=y.cpu().double(), ref_labels=ly.cpu())
    for k in (1, 5, None):
        got = pddm_ext.mine_hard(x, lx, unit, k=k, metric=metric, **kw)
        want = reference.mine_hard(x.cpu().double(), lx.cpu(), r_unit, k=k, metric=metric, **r_kw)
        for name, a, b in zip(("anchor", "positive", "anchor_negative", "positive_negative"), got[:4], want[:4]):
            assert torch.equal(a.cpu(), b), f"{metric}, k={k}: {name}"
        torch.testing.assert_close(got.scores.cpu(), want.scores, rtol=1e-10, atol=1e-10)
    for a, b in zip(pddm_ext.batch_hard(x, lx, unit, metric=metric, **kw),
                    reference.batch_hard(x.cpu().double(), lx.cpu(), r_unit, metric=metric, **r_kw)):
        assert torch.equal(a.cpu(), b), metric


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_mining_across_tile_edges(metric, batch, backend):
    """mine_hard (k = 1, 5, all) and batch_hard on random float64 inputs: the reference's indices
    exactly (no ties), its scores to 1e-10."""
    device, tiles_backend = backend
    dtype = torch.float64
    for case, (m, n) in enumerate(cases(metric, tiles_backend, dtype, batch)):
        g = torch.Generator().manual_seed(100 + case)
        x = torch.randn(m, D, dtype=dtype, generator=g).to(device)
        lx = torch.randint(0, 4, (m,), generator=g).to(device)
        y = None if n is None else torch.randn(n, D, dtype=dtype, generator=g).to(device)
        ly = None if n is None else torch.randint(0, 4, (n,), generator=g).to(device)
        unit = unit_on(device, dtype, case) if metric == "pddm" else None
        assert_mined_like_reference(x, lx, unit, metric, y, ly)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "reference"])
def test_euclidean_ties_across_tile_edges(batch, dtype, backend):
    """Rows of small integers (exact squared distances in both dtypes: many exact ties, some between
    rows on either side of a tile edge): every backend must pick the smallest index among equals,
    as the reference does, whichever tile the candidates sit in."""
    device, tiles_backend = backend
    for case, (m, n) in enumerate(cases("euclidean", tiles_backend, dtype, batch)):
        g = torch.Generator().manual_seed(200 + case)
        x = torch.randint(-1, 2, (m, 3), generator=g).to(device=device, dtype=dtype)
        lx = torch.randint(0, 3, (m,), generator=g).to(device)
        y = None if n is None else torch.randint(-1, 2, (n, 3), generator=g).to(device=device, dtype=dtype)
        ly = None if n is None else torch.randint(0, 3, (n,), generator=g).to(device)
        kw = {} if y is None else dict(ref_emb=y, ref_labels=ly)
        r_kw = {} if y is None else dict(ref_emb=y.cpu().double(), ref_labels=ly.cpu())
        for k in (1, 7, None):
            got = pddm_ext.mine_hard(x, lx, None, k=k, metric="euclidean", **kw)
            want = reference.mine_hard(x.cpu().double(), lx.cpu(), None, k=k, metric="euclidean", **r_kw)
            for a, b in zip(got[:4], want[:4]):
                assert torch.equal(a.cpu(), b), f"m={m}, n={n}, k={k}"
            assert torch.equal(got.scores.cpu().double(), want.scores)
        for a, b in zip(pddm_ext.batch_hard(x, lx, None, metric="euclidean", **kw),
                        reference.batch_hard(x.cpu().double(), lx.cpu(), None, metric="euclidean", **r_kw)):
            assert torch.equal(a.cpu(), b), f"m={m}, n={n}"
