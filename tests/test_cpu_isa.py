"""The instruction-set levels of the CPU kernels and PDDM_EXT_CPU_ISA (docs/design.md, "CPU kernels").

The CPU kernels are built for three x86 levels (baseline x86-64, avx2 = x86-64-v3, avx512 =
x86-64-v4) and run at the best one the CPU has unless PDDM_EXT_CPU_ISA names another, read at the
start of every op. Here each level this CPU has is forced in turn and must agree with the float64
reference as the default level does (the same tolerances as tests/test_scores.py and
tests/test_mining.py), stay deterministic and independent of the thread count; a bad value must
raise a ValueError naming the variable and the CPU's levels before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import reference
from helpers import assert_scores_close, make_unit, randn
from test_mining import check_batch_hard, check_quadruplets, mining_case

VARIABLE = "PDDM_EXT_CPU_ISA"
ALL_LEVELS = ("baseline", "avx2", "avx512")


def cpu_levels():
    """The levels this CPU has, lowest first (torch.ops.pddm_ext.cpu_isa with the variable unset)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(VARIABLE, raising=False)
        return tuple(torch.ops.pddm_ext.cpu_isa()[1:])


LEVELS = cpu_levels()


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    monkeypatch.setenv(VARIABLE, request.param)
    return request.param


def test_cpu_isa_reports_the_best_level_by_default(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    selected, *levels = torch.ops.pddm_ext.cpu_isa()
    assert levels[0] == "baseline" and tuple(levels) == ALL_LEVELS[: len(levels)]
    assert selected == levels[-1]
    monkeypatch.setenv(VARIABLE, "")  # empty is unset
    assert torch.ops.pddm_ext.cpu_isa()[0] == levels[-1]


def test_each_level_is_selected(level):
    assert torch.ops.pddm_ext.cpu_isa()[0] == level


def _assert_names_levels(excinfo, value):
    message = str(excinfo.value)
    assert VARIABLE in message and repr(value) in message
    assert ", ".join(LEVELS) in message  # the CPU's levels


@pytest.mark.parametrize("value", ["AVX2", "avx-512", "sse2", "native", " avx2", "2"])
def test_unknown_value_is_a_value_error(monkeypatch, value):
    monkeypatch.setenv(VARIABLE, value)
    x = randn(4, 3, dtype=torch.float32, seed=0)
    unit = make_unit(3, dtype=torch.float32)
    calls = [
        lambda: torch.ops.pddm_ext.cpu_isa(),
        lambda: unit(x),
        lambda: pddm_ext.mine_hard(x, torch.arange(4) // 2, unit),
        lambda: pddm_ext.batch_hard(x, torch.arange(4) // 2),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=VARIABLE) as excinfo:
            call()
        _assert_names_levels(excinfo, value)


def test_every_level_is_selected_or_refused(monkeypatch):
    """A level the CPU has is what the ops run at; one it lacks (avx512 on an AVX2 CPU, none on an
    AVX-512 one) is a ValueError saying so, from cpu_isa and from an op."""
    x = randn(4, 3, dtype=torch.float32, seed=0)
    for value in ALL_LEVELS:
        monkeypatch.setenv(VARIABLE, value)
        if value in LEVELS:
            assert torch.ops.pddm_ext.cpu_isa()[0] == value
            pddm_ext.batch_hard(x, torch.arange(4) // 2)
            continue
        for call in (torch.ops.pddm_ext.cpu_isa, lambda: pddm_ext.batch_hard(x, torch.arange(4) // 2)):
            with pytest.raises(ValueError, match="lacks") as excinfo:
                call()
            _assert_names_levels(excinfo, value)


def test_backward_reads_the_variable(monkeypatch):
    x = randn(6, 5, dtype=torch.float32, seed=0).requires_grad_(True)
    unit = make_unit(5, dtype=torch.float32)
    S = unit(x)
    monkeypatch.setenv(VARIABLE, "avx9")
    with pytest.raises(ValueError, match=VARIABLE):
        S.sum().backward()


def test_levels_round_differently():
    """The override takes effect: baseline x86-64 has no FMA, so its float32 scores differ in the
    last bits from the FMA levels' on the same inputs (while all agree with the reference)."""
    unit = make_unit(128, dtype=torch.float32, seed=3)
    x = randn(64, 128, dtype=torch.float32, seed=4)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in LEVELS:
            mp.setenv(VARIABLE, name)
            with torch.no_grad():
                results[name] = unit(x)
    distinct = {tuple(S.flatten().tolist()) for S in results.values()}
    assert len(distinct) == len(LEVELS)


# (m, n, d, h, c): widths below, at and past the vector widths (tails of 1..15 lanes), batch and reference mode.
SHAPES = [(33, None, 7, 9, 4), (17, 65, 4, 8, 3), (40, None, 128, 128, 128), (20, 37, 37, 19, 23)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m,n,d,h,c", SHAPES, ids=[f"m{s[0]}n{s[1]}d{s[2]}h{s[3]}c{s[4]}" for s in SHAPES])
def test_scores_and_gradients_match_reference(level, m, n, d, h, c, dtype):
    unit = make_unit(d, h, c, dtype=dtype, seed=m + d)
    x = randn(m, d, dtype=dtype, seed=1).requires_grad_(True)
    y = None if n is None else randn(n, d, dtype=dtype, seed=2).requires_grad_(True)
    g = randn(m, m if n is None else n, dtype=dtype, seed=5)
    S = unit(x, y)
    (S * g).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    yr = None if y is None else y.detach().double().requires_grad_(True)
    params = tuple(p.detach().double().requires_grad_(True) for p in unit.params())
    S_ref = reference.pddm_scores(xr, yr, params)
    (S_ref * g.double()).sum().backward()
    assert_scores_close(S.detach(), S_ref.detach(), dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    for got, want in [(x.grad, xr.grad)] + ([] if y is None else [(y.grad, yr.grad)]) + [
        (p.grad, q.grad) for p, q in zip(unit.params(), params)
    ]:
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype_name", ["f64", "f32"])
@pytest.mark.parametrize("mode", ["batch", "ref"])
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_mining_matches_brute_force(level, metric, mode, dtype_name):
    x, lx, unit, kwargs, brute, tol = mining_case(metric, mode, "unbalanced", dtype_name)
    for k in (1, 3, None):
        check_quadruplets(pddm_ext.mine_hard(x, lx, unit, k=k, **kwargs), brute, k, tol)
    check_batch_hard(pddm_ext.batch_hard(x, lx, unit, **kwargs), brute, tol)


@pytest.mark.multithreaded
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_level_is_deterministic_and_thread_count_independent(level, metric):
    """Several tiles split across 1 and 2 threads: bitwise the same mining results, twice over; the
    backward (per-thread partial sums merged in a fixed order) bitwise the same on repeated runs."""
    x, lx, unit, kwargs, brute, tol = mining_case(metric, "batch", "random", "f32", m=70, seed=11)
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        q = pddm_ext.mine_hard(x, lx, unit, k=7, **kwargs)
        runs.append(q)
    check_quadruplets(runs[0], brute, 7, tol)
    for q in runs[1:]:
        for got, want in zip(q, runs[0]):
            assert torch.equal(got, want) if torch.is_tensor(want) else got == want
    if metric == "pddm":
        grads = []
        torch.set_num_threads(2)
        for _ in range(2):
            xg = x.detach().clone().requires_grad_(True)
            unit.zero_grad(set_to_none=True)
            unit(xg).sum().backward()
            grads.append([xg.grad] + [p.grad.clone() for p in unit.params()])
        for got, want in zip(*grads):
            assert torch.equal(got, want)

