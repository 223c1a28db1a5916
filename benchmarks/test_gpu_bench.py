"""CI's rehearsal of the GPU benchmark (benchmarks/gpu_bench.py, issue 12) on the CPU.

``--device cpu --quick`` runs every peer (fused at each precision, the reference, torch.compile of it,
BatchHardMiner, torch.mm) at tiny sizes, so a change that breaks a path the GPU run takes fails here,
not in the few minutes a GPU is lent. Nothing here is timed: the targets are reported, not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_bench

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _row(op, peer, precision, time_s, m=4096, n=None, tflops=None, **extra):
    row = {"op": op, "m": m, "n": m if n is None else n, "peer": peer, "precision": precision, "dtype": "float32",
           "status": "ok", "time_s": time_s, "tflops": tflops}
    row.update(extra)
    return row


def test_cpu_rehearsal_runs_every_peer_and_reports_every_target(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_bench.py", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = doc["rows"]
    for row in rows:  # a measurement or a line saying why not
        assert row["status"] in ("ok", "skipped", "error"), row
        assert row.get("time_s") is not None or row.get("note"), row

    ok = {(r["peer"], r["precision"]) for r in rows if r["status"] == "ok"}
    for peer in gpu_bench.PEER_KINDS:
        if peer == "pml" and not HAS_PML:
            assert any(r["peer"] == "pml" and "not installed" in r["note"] for r in rows)
            continue
        assert any(p == peer for p, _ in ok), f"no measured row of {peer}: {[r for r in rows if r['peer'] == peer]}"
    for precision in gpu_bench.PRECISIONS:
        assert ("fused", precision) in ok and ("gemm", precision) in ok
    assert {("reference", "highest"), ("reference", "high")} <= ok
    assert {r["dtype"] for r in rows if r["peer"] == "gemm" and r["status"] == "ok"} == {"float32", "bfloat16", "float16"}
    ops = {r["op"] for r in rows if r["peer"] == "fused" and r["status"] == "ok"}
    assert ops == {"scores_fwd", "scores_fwd_bwd", "mine_k1", "batch_hard", "bank_mine"}
    assert any(r["peer"] == "compiled" and r.get("compile_s") for r in rows)

    targets = doc["targets"]
    assert len(targets) == 3 * len(gpu_bench.PRECISIONS)
    assert all(t["result"] in ("met", "not met") for t in targets), targets  # every target measured
    assert doc["float32_matmul_precision"] == {"before": "highest", "after": "highest"}
    text = (tmp_path / "results.md").read_text()
    assert "## Targets" in text and "bank_mine" in text


def test_precision_is_restored_also_after_an_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError):
        with gpu_bench.float32_matmul_precision("medium"):
            assert torch.get_float32_matmul_precision() == "medium"
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before


def test_missing_pml_is_a_skipped_row_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.miners", None)
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick"]))
    row = bench.measure("batch_hard", 16, 16, "pml", "highest")
    assert row["status"] == "skipped" and "pytorch-metric-learning not installed" in row["note"]


def test_budget_and_memory_skips_say_why():
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick", "--dim", "8"]))
    # 16 * 17 / 2 pairs of 2 (h d + 2 h c) = 384 useful FLOPs each (d = h = c = 8): 52,224 FLOPs
    bench.seconds_per_flop[("mine_k1", "fused", "highest")] = 1e-2
    assert "predicted ~522 s" in bench.measure("mine_k1", 16, 16, "fused", "highest")["note"]
    # the bank is predicted from mine_k1 at another precision when that is all there is
    assert "predicted ~" in bench.measure("bank_mine", 4, 64, "fused", "medium")["note"]
    memory, bench.memory = bench.memory, 1
    assert "needs ~" in bench.measure("scores_fwd", 16, 16, "reference", "highest")["note"]
    bench.memory, bench.budget_s = memory, 0
    assert "time budget" in bench.measure("scores_fwd", 16, 16, "fused", "high")["note"]
    bench.budget_s, bench.compile_budget_s = 1e9, 1
    per_pair = bench.calibrate_reference("scores_fwd")  # the GPU run's memory calibration, here on the CPU
    assert per_pair is None or per_pair > 0
    assert "compile budget" in bench.measure("mine_k1", 16, 16, "compiled", "highest")["note"]


def test_targets_from_made_up_rows():
    rows = [
        _row("gemm", "gemm", "highest", 1.0, m=8192, tflops=50.0),
        _row("gemm", "gemm", "high", 1.0, m=8192, tflops=400.0),
        _row("gemm", "gemm", "medium", 1.0, m=8192, tflops=400.0),
        _row("mine_k1", "fused", "highest", 0.010),
        _row("mine_k1", "reference", "highest", 0.040),  # 4x: not met
        _row("mine_k1", "compiled", "highest", 0.100),
        _row("mine_k1", "fused", "high", 0.004),
        _row("mine_k1", "reference", "high", 0.030),  # 7.5x: met
        _row("mine_k1", "fused", "medium", 0.002),  # against the "high" peers: 15x
        _row("scores_fwd", "fused", "highest", 0.1, m=1024, tflops=10.0),
        _row("scores_fwd", "fused", "highest", 0.1, m=16384, tflops=25.0),  # the largest m counts: 50%
        _row("scores_fwd", "fused", "high", 0.1, m=16384, tflops=100.0),  # 25%
        _row("bank_mine", "fused", "highest", 21.0, m=4096, n=1 << 20),
        _row("bank_mine", "fused", "medium", 1.5, m=4096, n=1 << 20),
    ]
    got = {(t["target"].split(":")[0].split()[0], t["precision"]): t for t in
           gpu_bench.check_targets(rows, 4096, [4096, 1 << 20], gpu_bench.PRECISIONS)}
    assert got[("mine_k1", "highest")]["result"] == "not met"
    assert got[("mine_k1", "highest")]["measured"] == pytest.approx(4.0)
    assert got[("mine_k1", "high")]["result"] == "met"
    assert got[("mine_k1", "medium")]["measured"] == pytest.approx(15.0)
    assert got[("scores_fwd", "highest")]["measured"] == pytest.approx(0.5)
    assert got[("scores_fwd", "highest")]["result"] == "met"
    assert got[("scores_fwd", "high")]["result"] == "not met"
    assert got[("scores_fwd", "medium")]["result"] == "not measured"
    assert got[("bank_mine", "highest")]["result"] == "not met"
    assert got[("bank_mine", "medium")]["result"] == "met"
    assert got[("bank_mine", "high")]["result"] == "not measured"
