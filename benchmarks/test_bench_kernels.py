"""pytest-benchmark versions of the suite's main workloads (the same steps as ``python -m benchmarks``).

CI runs them in smoke mode so they never rot (each step runs once, nothing is timed):

    python -m pytest benchmarks -q --benchmark-disable

Timed locally, at a size of your choice (the sizes default to tiny ones):

    PDDM_BENCH_M=512 PDDM_BENCH_D=128 python -m pytest benchmarks --benchmark-only --benchmark-group-by=group

The compiled variant is left to ``python -m benchmarks`` (one cold compile takes tens of seconds).
Numbers that back README claims come from ``python -m benchmarks``, not from here.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.workloads import build_step, make_config, make_inputs

M = int(os.environ.get("PDDM_BENCH_M", "48"))
D = int(os.environ.get("PDDM_BENCH_D", "16"))
DEVICE = os.environ.get("PDDM_BENCH_DEVICE", "cpu")

CASES = [
    ("scores_fwd", "fused"),
    ("scores_fwd", "reference"),
    ("scores_fwd_bwd", "fused"),
    ("scores_fwd_bwd", "reference"),
    ("scores_bwd_positives", "fused"),
    ("scores_bwd_positives", "reference"),
    ("mine_k1", "fused"),
    ("mine_k1", "reference"),
    ("mine_k64", "fused"),
    ("mine_k64", "reference"),
    ("batch_hard", "fused"),
    ("batch_hard", "reference"),
    ("batch_hard", "pml"),
]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize(("workload", "variant"), CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_bench_batch(benchmark, workload, variant):
    if variant == "pml":
        pytest.importorskip("pytorch_metric_learning")
    cfg = make_config(workload, variant, M, D, device=DEVICE)
    step = build_step(cfg, make_inputs(cfg), _sync)
    benchmark.group = f"{workload} m={M} d={D}"
    benchmark(step)


@pytest.mark.parametrize("variant", ["fused", "reference"])
@pytest.mark.parametrize("workload", ["bank_mine", "bank_fwd_bwd"])
def test_bench_bank(benchmark, workload, variant, monkeypatch):
    # The real bank (256 x 65,536) needs tens of GB in the reference: smoke it at a small size.
    import benchmarks.workloads as W

    monkeypatch.setattr(W, "BANK_QUERIES", 16)
    monkeypatch.setattr(W, "BANK_GRAD_QUERIES", 16)
    monkeypatch.setattr(W, "BANK_ROWS", 16 * W.BANK_ROWS_PER_CLASS)
    cfg = W.make_config(workload, variant, None, D, device=DEVICE)
    assert (cfg.m, cfg.n) == (16, 1024)
    step = build_step(cfg, make_inputs(cfg), _sync)
    benchmark.group = f"{workload} {cfg.m} x {cfg.n} d={D}"
    benchmark(step)


def test_fused_and_reference_steps_agree():
    """The two sides of the comparison compute the same mining result (guards the benchmark setup)."""
    import pddm_ext
    from pddm_ext import reference as R

    cfg = make_config("mine_k64", "fused", M, D, device=DEVICE)
    inputs = make_inputs(cfg)
    x, labels, unit = inputs["x"].double(), inputs["labels"], inputs["unit"].double()
    fused = pddm_ext.mine_hard(x, labels, unit, k=8)
    ref = R.mine_hard(x, labels, unit, k=8)
    torch.testing.assert_close(fused.scores, ref.scores, rtol=1e-6, atol=1e-8)
