"""The suite's own plumbing: planning, target checks, tables, plots and one real end-to-end run.

Fast (seconds); CI runs them with the pytest-benchmark smoke tests:
``python -m pytest benchmarks -q --benchmark-disable``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import machine, plot, report, run
from benchmarks.workloads import make_config, predicted_bytes, useful_flops

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def _entry(workload, variant, m, time_s, extra_mb, d=128, **extra):
    cfg = make_config(workload, variant, m, d)
    entry = {"config": cfg.to_dict(), "predicted_bytes": predicted_bytes(cfg), "status": "ok",
             "time_s": time_s, "times_s": [time_s] * 3, "extra_peak_bytes": int(extra_mb * MB)}
    entry.update(extra)
    return entry


def _doc(results, gemm_gflops=200.0):
    return {
        "command": "python -m benchmarks --quick", "tag": "quick", "device": "cpu",
        "started_utc": "2026-01-01T00:00:00+00:00", "finished_utc": "2026-01-01T00:03:00+00:00",
        "machine": {"cpu_model": "Test CPU", "usable_cores": 2, "ram_bytes": 8 * 2**30},
        "gemm": {"status": "ok", "size": 2048, "dtype": "float32", "gflops": gemm_gflops},
        "settings": {"warmup": 1, "min_repeats": 3, "max_repeats": 10, "memory_budget_bytes": 4 * 2**30},
        "results": results,
    }


def _by_target(doc):
    return {t["target"]: t for t in report.check_targets(doc)}


def test_useful_flops_formulas():
    cfg = make_config("scores_fwd", "fused", 1024, 128)
    assert useful_flops(cfg) == 1024 * 1025 // 2 * 2 * (128 * 128 + 2 * 128 * 128)
    assert useful_flops(make_config("scores_fwd_bwd", "fused", 1024, 128)) == 3 * useful_flops(cfg)
    # same-class loss: 256 classes of 4, each with 4 * 5 / 2 = 10 unordered pairs carrying a gradient
    per_pair = 2 * (128 * 128 + 2 * 128 * 128)
    assert useful_flops(make_config("scores_bwd_positives", "fused", 1024, 128)) == useful_flops(cfg) + 2 * 2560 * per_pair
    bank = make_config("bank_mine", "fused", None, 128)
    assert (bank.m, bank.n) == (256, 65536)
    assert useful_flops(bank) == 256 * 65536 * 2 * (128 * 128 + 2 * 128 * 128)
    assert useful_flops(make_config("batch_hard", "fused", 100, 8)) == 100 * 101 // 2 * 2 * 8


def test_reference_bank_mining_is_predicted_out_of_reach_and_fused_is_not():
    assert predicted_bytes(make_config("bank_mine", "reference", None, 128)) > 24 * 2**30
    assert predicted_bytes(make_config("bank_mine", "fused", None, 128)) < 100 * MB


def test_targets_pass_and_fail_on_the_measured_numbers():
    results = [
        _entry("mine_k1", "fused", 512, 0.10, 5),
        _entry("mine_k1", "reference", 512, 0.40, 1300),  # 4x: below the 5x target
        _entry("mine_k1", "fused", 1024, 0.60, 6, gemm_gflops_here=200.0),
        _entry("mine_k1", "reference", 1024, 8.0, 5000),
        _entry("mine_k1", "compiled", 1024, 2.4, 2000, compile_s=20.0),
        _entry("mine_k1", "fused", 2048, 1.2, 80),  # 80 MB: above the 64 MB target
        _entry("batch_hard", "fused", 8192, 0.5, 12),
        _entry("batch_hard", "pml", 8192, 3.0, 1900),
        _entry("scores_fwd_bwd", "fused", 1024, 2.0, 15, phases_s={"forward": 0.5, "backward": 1.5}),
        _entry("scores_fwd_bwd", "reference", 1024, 12.0, 4000, phases_s={"forward": 4.0, "backward": 8.0}),
    ]
    targets = _by_target(_doc(results))
    results_of = {name: t["result"] for name, t in targets.items()}
    assert results_of["mine_k1 m=512 d=h=c=128: fused >= 5x faster than reference"] == "FAIL"
    assert results_of["mine_k1 m=2048 d=128: fused extra peak memory < 64 MB"] == "FAIL"
    assert results_of["mine_k1 m=1024 d=h=c=128: fused >= 10x faster than reference"] == "PASS"
    assert results_of["mine_k1 m=1024 d=h=c=128: fused >= 3x faster than compiled"] == "PASS"
    # 1024*1025/2 * 2 * 49152 FLOPs in 0.6 s = 86 GFLOP/s = 43% of 200: a FAIL.
    assert results_of["mine_k1 m=1024 d=h=c=128: fused >= 50% of the measured GEMM rate (useful FLOPs)"] == "FAIL"
    assert results_of["batch_hard N=8192 d=128: fused >= 5x faster than BatchHardMiner"] == "PASS"
    assert results_of["batch_hard N=8192 d=128: fused extra peak memory <= 1/10 of BatchHardMiner's"] == "PASS"
    assert results_of["bank_mine 256 x 65,536 d=128: fused extra peak memory < 100 MB"] == "NOT MEASURED"
    assert results_of["scores_fwd_bwd m=1024 d=128: fused extra peak memory < 200 MB"] == "PASS"
    assert results_of["unit(x).sum().backward() m=1024 d=h=c=128: fused backward <= 3x fused forward"] == "PASS"


def test_markdown_and_plots(tmp_path):
    results = [
        _entry("mine_k1", "fused", 256, 0.02, 5, gemm_gflops_here=150.0),
        _entry("mine_k1", "fused", 512, 0.08, 5, gemm_gflops_here=150.0),
        _entry("mine_k1", "reference", 256, 0.30, 300),
        {"config": make_config("mine_k1", "reference", 4096, 128).to_dict(), "predicted_bytes": 90 * 2**30,
         "status": "skipped", "error": "needs 90.0 GB (budget 4.0 GB)"},
        {"config": make_config("mine_k1", "compiled", 512, 128).to_dict(), "predicted_bytes": 0,
         "status": "error", "error": "BackendCompilerFailed: no compiler"},
    ]
    doc = _doc(results)
    doc["targets"] = report.check_targets(doc)
    text = report.markdown(doc)
    assert "needs 90.0 GB" in text
    assert "15.0× vs reference" in text
    assert "BackendCompilerFailed: no compiler" in text
    paths = plot.plot_results(doc, tmp_path / "cpu_test")
    assert [p.name for p in paths] == ["cpu_test_time_d128.png", "cpu_test_memory_d128.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_quick_plan_covers_every_target():
    planned = {(c.workload, c.variant, c.m) for c in run.quick_plan("cpu")}
    for needed in [("mine_k1", "fused", 512), ("mine_k1", "reference", 512), ("mine_k1", "fused", 2048),
                   ("mine_k1", "compiled", 1024), ("batch_hard", "pml", 8192), ("bank_mine", "fused", 256),
                   ("scores_fwd_bwd", "reference", 1024)]:
        assert needed in planned


def test_end_to_end_tiny_run(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--workloads", "mine_k1", "scores_fwd_bwd", "--variants", "fused",
           "--m", "16", "--d", "8", "--min-repeats", "1", "--budget-s", "0", "--gemm-size", "128",
           "--out", str(tmp_path), "--tag", "smoke", "--no-plots"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu_smoke.json").read_text())
    assert [e["status"] for e in doc["results"]] == ["ok", "ok"], doc["results"]
    assert doc["machine"]["torch_facts"]["torch"]
    entry = doc["results"][1]
    assert set(entry["phases_s"]) == {"forward", "backward"}
    assert entry["extra_peak_bytes"] >= 0
    assert (tmp_path / "cpu_smoke.md").exists()
    # the level the kernels ran at, the CPU's levels and (where the CPU is in the table) the FMA peak
    facts = doc["machine"]["torch_facts"]
    assert facts["cpu_isa"] == facts["cpu_isa_levels"][-1] and facts["cpu_isa_forced"] is False
    assert doc["machine"]["cpu"]["family"] is not None
    if doc["machine"]["cpu"].get("fma_units") and doc["machine"]["cpu"].get("clock_mhz"):
        assert doc["peak"]["gflops"] > 0


def test_forced_level_is_recorded_and_a_bad_one_stops_the_run(tmp_path):
    base = [sys.executable, "-m", "benchmarks", "--workloads", "mine_k1", "--variants", "fused", "--m", "16", "--d", "8",
            "--min-repeats", "1", "--budget-s", "0", "--gemm-size", "64", "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.run(base + ["--cpu-isa", "baseline"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu_custom_baseline.json").read_text())
    assert doc["machine"]["torch_facts"]["cpu_isa"] == "baseline" and doc["machine"]["torch_facts"]["cpu_isa_forced"]
    assert "kernels at baseline (forced by PDDM_EXT_CPU_ISA" in (tmp_path / "cpu_custom_baseline.md").read_text()
    env = dict(os.environ, PDDM_EXT_CPU_ISA="avx1024")
    proc = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "PDDM_EXT_CPU_ISA='avx1024'" in proc.stderr


ZEN1 = {"vendor": "AuthenticAMD", "family": 23, "model": 1, "fma_units": 2, "fma_datapath_bits": 128, "clock_mhz": 2000.0}
ZEN4 = {"vendor": "AuthenticAMD", "family": 25, "model": 17, "fma_units": 2, "fma_datapath_bits": 256, "clock_mhz": 2600.0}


def test_fma_peak_formula():
    # Zen 1 at 2.0 GHz, 2 cores: 2 units x 4 lanes (128-bit) x 2 x 2.0 GHz x 2 = 64 GFLOP/s at AVX2 and AVX-512 alike
    assert machine.fma_peak(ZEN1, "avx2", 2)["gflops"] == 64.0
    assert machine.fma_peak(ZEN1, "baseline", 2)["gflops"] == 64.0
    # Zen 4: 256-bit datapaths, so AVX-512 does not double the peak; the baseline has 4 lanes
    assert machine.fma_peak(ZEN4, "avx512", 2)["gflops"] == machine.fma_peak(ZEN4, "avx2", 2)["gflops"] == 166.4
    assert machine.fma_peak(ZEN4, "baseline", 1)["gflops"] == 41.6
    assert machine.fma_peak(ZEN4, None, 2) is None and machine.fma_peak({"vendor": "x"}, "avx2", 2) is None


def test_rates_are_shares_of_gemm_and_of_the_peak():
    doc = _doc([_entry("mine_k1", "fused", 1024, 0.60, 5)], gemm_gflops=200.0)
    doc["peak"] = machine.fma_peak(ZEN4, "avx2", 2)
    doc["machine"]["cpu"] = dict(ZEN4, source="/proc/cpuinfo", fma_source="table", clock_source="lscpu CPU max MHz")
    doc["targets"] = report.check_targets(doc)
    text = report.markdown(doc)
    # 1024*1025/2 * 2 * 49152 FLOPs in 0.6 s = 86 GFLOP/s: 43% of 200, 52% of 166.4
    assert "| 86 (43% of GEMM, 52% of peak) |" in text
    assert "2 cores x 2 FMA units x 8 fp32 lanes x 2 x 2.60 GHz = 166 GFLOP/s" in text
    assert "(family 25 model 17" in text


def test_levels_side_by_side():
    """A run timing the fused configurations at two levels: one column each, rates per level, the
    targets and speed-ups from the first level."""
    results = [
        _entry("mine_k1", "fused", 1024, 0.60, 5, cpu_isa="avx512"),
        _entry("mine_k1", "fused", 1024, 1.20, 5, cpu_isa="avx2"),
        _entry("mine_k1", "reference", 1024, 6.0, 5000),
    ]
    doc = _doc(results, gemm_gflops=200.0)
    doc["peaks"] = {"avx512": machine.fma_peak(ZEN4, "avx512", 2), "avx2": machine.fma_peak(ZEN1, "avx2", 2)}
    doc["targets"] = report.check_targets(doc)
    assert report.find(doc, "mine_k1", "fused", 1024)["cpu_isa"] == "avx512"
    text = report.markdown(doc)
    assert "| fused at avx512: time · extra peak | fused at avx2: time · extra peak | reference: time · extra peak |" in text
    # 86 GFLOP/s at avx512 (52% of 166.4), 43 at avx2 (67% of the 64 GFLOP/s given for it)
    assert "avx512: 86 (43% of GEMM, 52% of peak); avx2: 43 (21% of GEMM, 67% of peak)" in text
    assert "2.0× vs fused at avx2, 10.0× vs reference" in text
