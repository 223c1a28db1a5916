"""CI's rehearsal of the GPU benchmark (benchmarks/gpu_bench.py) on the CPU.

``--device cpu --quick`` runs every peer (fused at each precision, the reference, torch.compile of it,
BatchHardMiner, torch.mm) at tiny sizes, so a change that breaks a path the GPU run takes fails here,
not in the few minutes a GPU is lent. Also: a run killed mid-way leaves every row it measured, the
plan's order by value, the bank row's extrapolation, the arithmetic bounds of the targets. Nothing
here is timed: the targets are reported, not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_bench, gpu_preflight

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
    doc = json.loads((tmp_path / "results.json").read_text())["bench"]
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
    assert ops == {"scores_fwd", "scores_fwd_bwd", "mine_k1", "batch_hard", "bank_mine", "lock_mine"}
    assert {(r["dtype"], r["bank"]) for r in rows if r["op"] == "lock_mine" and r["status"] == "ok"} == {
        ("float64", "random"), ("float32", "random"), ("float64", "ties"), ("float32", "ties")}
    assert rows[-1]["op"] == "bank_mine" and all(r.get("extrapolated") for r in rows if r["op"] == "bank_mine")
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


def test_missing_pml_is_a_skipped_row_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.miners", None)
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)]))
    row = bench.measure("batch_hard", 16, 16, "pml", "highest")
    assert row["status"] == "skipped" and "pytorch-metric-learning not installed" in row["note"]


def test_budget_and_memory_skips_say_why(tmp_path):
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick", "--dim", "8", "--out", str(tmp_path)]))
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


def test_a_killed_run_leaves_every_row_it_measured(tmp_path):
    """results.json / results.md are rewritten after every row (atomically): kill -9 mid-run, read them."""
    cmd = [sys.executable, "benchmarks/gpu_bench.py", "--device", "cpu", "--quick", "--compile-budget-s", "0",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    rows = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows = json.loads((tmp_path / "results.json").read_text())["bench"]["rows"]
            except (OSError, ValueError, KeyError):
                rows = []
            if len(rows) >= 4:
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        printed = proc.communicate()[0]
    assert len(rows) >= 4, printed[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())  # whole, though killed at any moment
    got = doc["bench"]["rows"]
    assert len(got) >= 4 and got[:4] == rows[:4]
    assert [(r["op"], r["peer"], r["precision"]) for r in got[:4]] == [
        ("mine_k1", "fused", "highest"), ("mine_k1", "fused", "high"), ("mine_k1", "fused", "medium"),
        ("mine_k1", "reference", "highest")]
    assert "bank_mine" not in {r["op"] for r in got}  # killed long before the last row
    text = (tmp_path / "results.md").read_text()
    assert text.count("| mine_k1 | 128 | 128 |") >= 4


def test_plan_is_ordered_by_value():
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu"]))
    plan = bench.plan()
    kinds = [step[0] if step[0] != "measure" else f"{step[1]}@{step[2]}" for step in plan]
    assert kinds[:3] == ["mine_k1@4096", "scores_fwd@4096", "batch_hard@4096"]
    assert kinds[3:8] == ["gemm"] * 5
    assert kinds[8:10] == ["lock", "scores_fwd_bwd@4096"]
    assert kinds.index("compile") > max(i for i, k in enumerate(kinds) if k.endswith("@16384"))
    assert kinds[-1] == "bank"
    assert bench.peers("batch_hard")[3:5] == [("pml", "highest"), ("pml", "high")]  # the strongest peer first
    assert (bench.bank, bench.bank_fraction, bench.lock) == ([4096, 1 << 20], 16, [256, 131_072, 64])


def test_bank_row_is_extrapolated_and_labelled(monkeypatch):
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick", "--dim", "8", "--out", "/nonexistent"]))
    monkeypatch.setattr(bench, "write", lambda: None)
    seen = []
    monkeypatch.setattr(gpu_bench.measure, "measure_config",
                        lambda spec: seen.append(spec["config"]["n"]) or {"time_s": 0.5, "times_s": [0.5]})
    row = bench.measure("bank_mine", 64, 4096, "fused", "high", fraction=4)
    assert seen == [1024] and row["n"] == 4096 and row["measured_n"] == 1024
    assert row["time_s"] == pytest.approx(2.0) and row["note"].startswith("extrapolated: measured on 1,024 of the 4,096")


def test_arithmetic_bounds_beside_the_targets():
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick"]))
    bench.peaks = gpu_preflight.peak_rates("9.0", 132, 1980)
    bank = {"useful_flops": 4096 * (1 << 20) * 98_304, "peer": "fused", "precision": "highest", "dtype": "float32"}
    assert bench.bound(dict(bank, arithmetic="FP32")) == (pytest.approx(6.31, abs=0.01), "peak")
    assert bench.bound(dict(bank, arithmetic="3xTF32"))[0] == pytest.approx(2.37, abs=0.01)
    rows = [_row("bank_mine", "fused", "highest", 21.0, n=1 << 20, bound_s=6.31, bound_source="peak"),
            _row("mine_k1", "fused", "medium", 0.002, bound_s=0.0005, bound_source="peak"),
            _row("mine_k1", "reference", "high", 0.030)]
    got = {(t["target"].split()[0], t["precision"]): t for t in
           gpu_bench.check_targets(rows, 4096, [4096, 1 << 20], gpu_bench.PRECISIONS)}
    assert got[("bank_mine", "highest")]["bound"] == 6.31
    assert "out of reach" in got[("bank_mine", "highest")]["bound_detail"]
    assert got[("mine_k1", "medium")]["bound"] == pytest.approx(60.0)  # the peer's 30 ms over the 0.5 ms bound


def test_lock_case_hang_or_wrong_answer_is_a_row_not_a_stall(monkeypatch, tmp_path):
    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)]))
    boxes = []
    monkeypatch.setattr(gpu_bench, "run_module", lambda args, timeout: boxes.append(timeout) or (None, "", "", timeout))
    bench.lock_case()
    assert boxes == [gpu_bench.LOCK_BOX_S]
    assert bench.rows[-1]["status"] == "error" and "no result within 60 s" in bench.rows[-1]["note"]
    slots = {"positives": {"slots": 16, "optimal": 15, "consistent": 16, "missing": 0, "exact_ties": 0,
                           "ties_to_smallest_index": 0}}
    result = [{"bank": "random", "dtype": "float64", "time_s": 0.2, "times_s": [0.2], "correct": False, "checks": slots}]
    monkeypatch.setattr(gpu_bench, "run_module", lambda args, timeout: (0, "RESULT " + json.dumps(result), "", 1.0))
    bench.lock_case()
    assert bench.rows[-1]["status"] == "error" and "WRONG (positives 15/16 optimal)" in bench.rows[-1]["note"]
    bench.budget_s = 0
    bench.lock_case()
    assert bench.rows[-1]["status"] == "skipped" and "the lock case needs" in bench.rows[-1]["note"]
