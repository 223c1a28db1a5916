"""benchmarks/gpu_check.sh rehearsed on the CPU: the preflight's one-line stops (no GPU, a toolkit of
another CUDA major version, a package neither installed nor carried), faked with stand-ins for
nvidia-smi / nvcc / ninja on PATH and the facts of GPU_CHECK_FACTS; the whole script in its CPU
rehearsal (GPU_CHECK_REHEARSAL=1): a hanging test killed at its time box and named, a benchmark
budget so small that rows are skipped, the files a remote run returns; a script budget so small
that the steps themselves are skipped."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_preflight, gpu_results

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
H100 = {"cuda_available": True, "device_count": 1, "torch_cuda": "13.0", "gpu": "NVIDIA H100 80GB HBM3",
        "sms": 132, "capability": "9.0"}


def _tool(bindir, name, text):
    path = bindir / name
    path.write_text(f"#!/bin/sh\necho '{text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_machine(tmp_path, nvcc_release):
    """A bin folder with nvidia-smi, nvcc (CUDA `nvcc_release`) and ninja stand-ins; the environment."""
    bindir = tmp_path / "cuda" / "bin"
    bindir.mkdir(parents=True)
    _tool(bindir, "nvidia-smi", "NVIDIA H100 80GB HBM3, 575.57.08, 1980, 1980, 2619, 2619, 700.00, 35, Enabled, 0x0")
    _tool(bindir, "nvcc", f"Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.41")
    _tool(bindir, "ninja", "1.11.1")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", CUDA_HOME=str(tmp_path / "cuda"),
               PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_WHEELS=str(tmp_path / "no-wheels"))
    env.pop("GPU_CHECK_LOGGED", None)
    return env


def _run(env, timeout=120):
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("case", ["no GPU", "CUDA major mismatch", "missing wheel"])
def test_preflight_stops_at_once_with_one_line(tmp_path, case):
    env = _fake_machine(tmp_path, "12.8" if case == "CUDA major mismatch" else "13.0")
    facts = dict(H100)
    if case == "no GPU":
        facts.update(cuda_available=False, device_count=0)
    if case == "missing wheel":
        facts["installed"] = {"scipy": None}  # as on a machine without scipy, and no wheel of it carried
    env["GPU_CHECK_FACTS"] = json.dumps(facts)
    proc, seconds = _run(env)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    want = {"no GPU": "gpu_check: no GPU: torch",
            "CUDA major mismatch": "gpu_check: CUDA toolkit 12.8 (",
            "missing wheel": "gpu_check: scipy is neither installed nor among the wheels in"}[case]
    assert lines[0].startswith(want), lines[0]
    if case == "CUDA major mismatch":
        assert "does not match torch's CUDA 13.0" in lines[0]
    assert seconds < 60
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["steps"][-1]["name"] == "preflight" and doc["steps"][-1]["status"] == "failed"
    assert (tmp_path / "out" / "gpu_check.log").read_text().strip() == lines[0]


def test_preflight_checks_in_order_from_injected_facts():
    facts = dict(H100, nvcc={"path": "/usr/local/cuda/bin/nvcc", "version": "13.0"}, cxx={"path": "/usr/bin/c++"},
                 ninja=None, installed={d: "1" for d in gpu_preflight.REQUIRED_DISTS}, wheels=[], wheels_dir=".whl")
    found = gpu_preflight.problems(facts)
    assert [(kind, fatal) for kind, fatal, _ in found] == [("toolkit", True)]
    assert found[0][2].startswith("ninja is not on PATH")
    facts.update(ninja={"path": "/usr/bin/ninja"}, installed=dict(facts["installed"], **{"pytorch-metric-learning": None}))
    assert gpu_preflight.problems(facts)[0][:2] == ("wheels", True)
    facts["wheels"] = ["pytorch_metric_learning-2.9.0-py3-none-any.whl"]  # carried: nothing missing
    assert gpu_preflight.problems(facts) == []
    facts["wheels"] = []
    assert gpu_preflight.problems(facts, allow_missing_wheels=True)[0][:2] == ("wheels", False)
    assert gpu_preflight.wheel_dist("scipy-1.15.3-cp312-cp312-manylinux_2_17_x86_64.whl") == "scipy"


def test_peak_rates_give_the_bank_bounds():
    """The 4096 x 1,048,576 bank, 98,304 FLOPs per pair, on an H100/H200 (132 SMs, 1980 MHz)."""
    rates = gpu_preflight.peak_rates("9.0", 132, 1980)
    flops = 4096 * (1 << 20) * 98_304
    assert flops / rates["FP32"] == pytest.approx(6.31, abs=0.01)  # "at least 6.3 s at the FP32 peak"
    assert flops / rates["3xTF32"] == pytest.approx(2.37, abs=0.01)
    assert gpu_preflight.peak_rates("7.5", 40, 1500) == {}


def test_rehearsal_of_the_whole_script(tmp_path):
    hang = tmp_path / "test_hang.py"
    hang.write_text("import time\n\ndef test_passes():\n    pass\n\ndef test_hangs():\n    time.sleep(120)\n")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_REHEARSAL="1",
               GPU_CHECK_TESTS=str(hang), GPU_CHECK_TESTS_TIMEOUT_S="10",
               GPU_CHECK_PRECISION_ARGS="--device cpu --m 12 --n 9 --dim 8 --classes 3 --seeds 1",
               GPU_CHECK_BENCH_ARGS="--device cpu --quick --compile-budget-s 0", GPU_CHECK_BENCH_BUDGET_S="2",
               GPU_CHECK_ALLOW_MISSING_WHEELS="1")  # BatchHardMiner's import check: in the tiny-budget test
    env.pop("GPU_CHECK_LOGGED", None)
    proc, _ = _run(env, timeout=300)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the hanging test fails the run
    # What a remote run returns: at most 8 files, none in a folder.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"results.json", "results.md", "gpu_check.log", "test_cuda.log"} <= set(files)
    doc = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]] == ["preflight", "wheels", "build", "tests", "sanitizer", "precision",
                                                 "bench", "ncu"]
    assert steps["tests"]["status"] == "timeout" and "test_hang.py::test_hangs" in steps["tests"]["line"]
    assert doc["tests"]["last_started"].endswith("test_hangs")
    assert steps["precision"]["status"] == "ok" and "| medium |" in doc["precision"]["markdown"]
    assert steps["bench"]["status"] == "ok" and steps["sanitizer"]["status"] == "skipped"
    assert doc["machine"]["tree_hash"] == gpu_preflight.tree_hash()
    rows = doc["bench"]["rows"]
    assert (rows[0]["op"], rows[0]["peer"], rows[0]["m"]) == ("mine_k1", "fused", doc["bench"]["target_m"])
    assert rows[-1]["op"] == "bank_mine"  # last, however the budget went
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all("budget" in r["note"] for r in skipped)
    assert any(r["status"] == "ok" for r in rows)
    text = (out / "results.md").read_text()
    assert "## Steps" in text and "| tests | **timeout** |" in text and "### Targets" in text
    assert (out / "gpu_check.log").read_text().count("[gpu_check") >= 8


def test_a_tiny_budget_skips_the_steps_saying_so(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_REHEARSAL="1",
               CHECK_BUDGET_S="3")
    env.pop("GPU_CHECK_LOGGED", None)
    proc, _ = _run(env)
    assert proc.returncode == 1  # the tests did not run: not a pass
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    for name in ("tests", "precision", "bench"):
        assert steps[name]["status"] == "skipped" and "left of the 3 s budget" in steps[name]["line"], steps[name]


def test_log_parsers():
    log = ("tests/test_cuda.py::test_a PASSED [ 50%]\ntests/test_cuda.py::test_b FAILED [100%]\n"
           "=== slowest 15 durations ===\n12.50s call     tests/test_cuda.py::test_b\n"
           "FAILED tests/test_cuda.py::test_b - AssertionError\n===== 1 failed, 1 passed, 2 skipped in 14.2s =====\n")
    got = gpu_results.parse_pytest(log)
    assert got["counts"] == {"failed": 1, "passed": 1, "skipped": 2}
    assert got["failed"] == ["tests/test_cuda.py::test_b"] and got["slowest"][0]["seconds"] == 12.5
    memcheck = "case scores ok\ncase mine_float64 ok\ncase mine_float32 ok\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_results.parse_sanitizer(memcheck, 0)["status"] == "ok"
    race = "case scores ok\n========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert gpu_results.parse_sanitizer(race, 3)["status"] == "failed"
    assert gpu_results.parse_sanitizer("========= Error: Target application terminated before first "
                                       "instrumented API call\n", 1)["status"] == "skipped"
    assert gpu_results.parse_sanitizer("case scores ok\n", 124)["status"] == "timeout"


# ncu --csv output in its two layouts (abridged): --page raw (a column per metric, a row of units) and
# --page details (a row per metric).
NCU_RAW = '''==PROF== Connected to process 123
"ID","Process ID","Kernel Name","sm__warps_active.avg.pct_of_peak_sustained_active","launch__registers_per_thread","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active","l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"
"","","","%","register/thread","ratio","ratio","%",""
"0","123","scores_kernel","12.40","232","3.10","0.70","41.2","1,024"
'''
NCU_DETAILS = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python","h","scores_kernel","1","7","Occupancy","Achieved Occupancy","%","12.41"
"0","123","python","h","scores_kernel","1","7","Occupancy","Theoretical Occupancy","%","12.50"
'''


def test_ncu_parser_reads_both_csv_layouts():
    raw = gpu_results.parse_ncu(NCU_RAW)
    assert len(raw) == 1 and raw[0]["kernel"] == "scores_kernel"
    assert raw[0]["achieved_occupancy_pct"] == 12.4 and raw[0]["registers_per_thread"] == 232
    assert list(raw[0]["stalls_per_issue"]) == ["barrier", "long_scoreboard"]
    assert raw[0]["tensor_pipe"] and raw[0]["shared_memory"]["l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"] == 1024
    details = gpu_results.parse_ncu(NCU_DETAILS)
    assert details[0]["achieved_occupancy_pct"] == 12.41 and details[0]["theoretical_occupancy_pct"] == 12.5
