"""The benchmark driver: plans configurations, measures each in a fresh process, writes results.

    python -m benchmarks --quick                 # the README numbers and target checks (< 3 min on 2 cores)
    python -m benchmarks                         # the full sweep: m = 64..4096, d = h = c in {64, 128, 256}
    python -m benchmarks --device cuda --quick   # the same on a GPU
    python -m benchmarks --workloads mine_k1 --variants fused reference --m 256 512 --d 128

Writes ``<device>_<tag>.json`` (machine, GEMM roofline, every configuration, target checks),
``<device>_<tag>.md`` (the tables) and PNG plots under ``benchmarks/results/``.
Configurations whose predicted memory exceeds the budget (default: half the RAM or device
memory) are not run and appear as "needs X GB".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import machine, report
from .workloads import BANK_WORKLOADS, WORKLOAD_VARIANTS, WORKLOADS, VARIANTS, make_config, predicted_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_M = (64, 128, 256, 512, 1024, 2048, 4096)
FULL_D = (64, 128, 256)
BATCH_HARD_EXTRA_M = (8192,)  # batch_hard always runs here too: the BatchHardMiner target size


def quick_plan(device):
    """The configurations behind the issue targets, at d = h = c = 128."""
    d = 128
    plan = [
        ("mine_k1", ("fused", "reference"), 512),
        ("mine_k1", ("fused", "reference", "compiled"), 1024),
        ("mine_k1", ("fused", "reference"), 2048),
        ("mine_k64", ("fused",), 1024),
        ("scores_fwd", ("fused",), 1024),
        ("scores_fwd_bwd", ("fused", "reference"), 1024),
        ("scores_bwd_positives", ("fused",), 1024),
        ("batch_hard", ("fused", "pml"), 1024),
        ("batch_hard", ("fused", "pml"), 4096),
        ("batch_hard", ("fused", "pml"), 8192),
        ("bank_mine", ("fused", "reference"), None),
        ("bank_fwd_bwd", ("fused",), None),
    ]
    return [make_config(w, v, m, d, device=device) for w, variants, m in plan for v in variants]


def full_plan(device, workloads, variants, ms, ds):
    configs = []
    for workload in workloads:
        for d in ds:
            if workload in BANK_WORKLOADS and d != 128 and 128 in ds:
                continue  # the bank workloads are defined at d = 128
            sizes = [None] if workload in BANK_WORKLOADS else list(ms)
            if workload == "batch_hard":
                sizes += [m for m in BATCH_HARD_EXTRA_M if m not in sizes]
            for m in sizes:
                for variant in WORKLOAD_VARIANTS[workload]:
                    if variant in variants:
                        configs.append(make_config(workload, variant, m, d, device=device))
    return configs


def build_facts():
    """Which code was measured: the git commit, whether csrc/ differs from it, the extension's hash."""
    facts = {}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()  # noqa: E731
        facts["git_commit"] = git("rev-parse", "--short", "HEAD")
        facts["csrc_modified"] = bool(git("status", "--porcelain", "--", "csrc"))
    except (OSError, subprocess.SubprocessError):
        pass
    for so in sorted((REPO_ROOT / "pddm_ext").glob("_C*.so")):
        facts["extension"] = so.name
        facts["extension_sha256"] = hashlib.sha256(so.read_bytes()).hexdigest()[:12]
        facts["extension_mtime_utc"] = datetime.datetime.fromtimestamp(so.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return facts


def run_child(spec, timeout_s, env):
    """Runs benchmarks.measure in a fresh process; returns its result dict (never raises)."""
    cmd = [sys.executable, "-m", "benchmarks.measure", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # so a timeout can end the child's compile workers too
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "error": f"no result within {timeout_s} s", "wall_s": timeout_s}
    wall = time.perf_counter() - started
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = wall
            return result
    why = f"exit code {proc.returncode}"
    if proc.returncode and proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    return {"status": "crashed", "error": why, "stderr_tail": err[-3000:], "wall_s": wall}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the configurations behind the targets (< 3 min on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="with --quick too: its configurations of these variants")
    p.add_argument("--m", nargs="+", type=int, default=list(FULL_M), help="batch sizes of the sweep")
    p.add_argument("--d", nargs="+", type=int, default=list(FULL_D), help="d = h = c values of the sweep")
    p.add_argument("--budget-gb", type=float, default=None, help="skip configurations predicted above this (default: half of RAM / device memory)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 180 quick, 600 full)")
    p.add_argument("--min-repeats", type=int, default=None, help="timed calls at least (default 3 quick, 5 full)")
    p.add_argument("--max-repeats", type=int, default=None, help="timed calls at most (default 10 quick, 20 full)")
    p.add_argument("--budget-s", type=float, default=None, help="time per configuration for extra repeats (default 2 quick, 8 full)")
    p.add_argument("--slow-s", type=float, default=None, help="a first call slower than this is timed and 2 calls suffice (default 5 quick, 30 full)")
    p.add_argument("--gemm-size", type=int, default=None, help="side of the torch.mm roofline matrices (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--cpu-isa", nargs="+", choices=("baseline", "avx2", "avx512"), default=None,
                   help="run the CPU kernels at these instruction-set levels (PDDM_EXT_CPU_ISA of each measurement; "
                        "default: the variable as set, else the CPU's best level): every fused configuration once per "
                        "level, side by side; the other variants and torch.mm under the first; the default tag gets _<levels>")
    p.add_argument("--tag", default=None, help="result file stem suffix (default: quick, full or custom)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the predicted memory, measure nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    custom = any(
        getattr(args, name) != default
        for name, default in (("workloads", list(WORKLOADS)), ("variants", list(VARIANTS)), ("m", list(FULL_M)), ("d", list(FULL_D)))
    )
    tag = args.tag or ("quick" if args.quick else "custom" if custom else "full") + "".join(f"_{level}" for level in args.cpu_isa or ())
    min_repeats = args.min_repeats or (3 if args.quick else 5)
    max_repeats = args.max_repeats or (10 if args.quick else 20)
    budget_s = args.budget_s if args.budget_s is not None else (2.0 if args.quick else 8.0)
    timeout_s = args.timeout or (180.0 if args.quick else 600.0)
    slow_s = args.slow_s if args.slow_s is not None else (5.0 if args.quick else 30.0)

    if args.quick:
        configs = [c for c in quick_plan(args.device) if c.variant in args.variants]
    else:
        configs = full_plan(args.device, args.workloads, args.variants, args.m, args.d)

    facts = machine.describe()
    code_at_start = build_facts()
    env = dict(os.environ)
    inductor_cache = tempfile.mkdtemp(prefix="pddm-bench-inductor-")
    env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache  # compile times are cold-cache, once per run
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if args.cpu_isa:
        env["PDDM_EXT_CPU_ISA"] = args.cpu_isa[0]

    started = datetime.datetime.now(datetime.timezone.utc)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    gemm_size = args.gemm_size or (8192 if args.device == "cuda" else 2048)
    if args.dry_run:
        gemm = {"status": "not run"}
    else:
        log(f"measuring torch.mm {gemm_size}^2 float32 on {args.device} ...")
        gemm = run_child({"kind": "gemm", "device": args.device, "size": gemm_size}, timeout_s, env)
        if gemm.get("status") != "ok":
            log(f"GEMM measurement failed: {gemm}")
            return 1
        facts["torch_facts"] = gemm.pop("facts")
        log(f"  {gemm['gflops']:.1f} GFLOP/s")
        isa_error = facts["torch_facts"].get("cpu_isa_error")
        if args.device == "cpu" and isa_error and "PDDM_EXT_CPU_ISA" in isa_error:
            log(f"the CPU kernels cannot run as asked: {isa_error}")
            return 1

    if args.budget_gb is not None:
        budget = int(args.budget_gb * 2**30)
    elif args.device == "cuda" and facts.get("torch_facts", {}).get("gpu_memory_bytes"):
        budget = facts["torch_facts"]["gpu_memory_bytes"] // 2
    else:
        budget = (facts["ram_bytes"] or 8 * 2**30) // 2

    results = []
    for index, cfg in enumerate(configs, 1):
        entry = {"config": cfg.to_dict(), "predicted_bytes": predicted_bytes(cfg)}
        prefix = f"[{index}/{len(configs)}] {cfg.label()}"
        if entry["predicted_bytes"] > budget:
            entry.update(status="skipped", error=f"needs {entry['predicted_bytes'] / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)")
            log(f"{prefix}: skipped, {entry['error']}")
        elif args.dry_run:
            entry.update(status="planned")
            log(f"{prefix}: predicted {entry['predicted_bytes'] / 2**20:.0f} MB")
        else:
            spec = {"config": cfg.to_dict(), "warmup": 1, "min_repeats": min_repeats,
                    "max_repeats": max_repeats, "budget_s": budget_s, "slow_s": slow_s,
                    "gemm_size": gemm_size}
            levels = args.cpu_isa if args.cpu_isa and cfg.variant == "fused" else [None]
            for level in levels:
                one = dict(entry)
                if level is not None:
                    one["cpu_isa"] = level
                one.update(run_child(spec, timeout_s, env if level is None else dict(env, PDDM_EXT_CPU_ISA=level)))
                log(f"{prefix}{f' at {level}' if level else ''}: {report.describe_entry(one)}")
                results.append(one)
            continue
        results.append(entry)

    facts["load_average_end"] = machine.load_average()
    code_at_end = build_facts()
    if code_at_end.get("extension_sha256") != code_at_start.get("extension_sha256"):
        code_at_start["rebuilt_during_run"] = code_at_end.get("extension_mtime_utc") or "removed"
        log("warning: the extension changed during the run; the results mix two builds")
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {
        "command": command.strip(),
        "tag": tag,
        "device": args.device,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": facts,
        "code": code_at_start,
        "gemm": gemm,
        "settings": {"warmup": 1, "min_repeats": min_repeats, "max_repeats": max_repeats,
                     "repeat_budget_s": budget_s, "slow_call_s": slow_s, "timeout_s": timeout_s, "memory_budget_bytes": budget,
                     "compile_cache": "fresh TorchInductor cache per run (cold compile)"},
        "results": results,
    }
    if args.device == "cpu" and not args.dry_run:
        torch_facts = facts.get("torch_facts", {})
        cores = min(torch_facts.get("threads") or 1, facts.get("usable_cores") or 1)
        doc["peak"] = machine.fma_peak(facts.get("cpu"), torch_facts.get("cpu_isa"), cores)
        doc["peaks"] = {level: machine.fma_peak(facts.get("cpu"), level, cores)
                        for level in (args.cpu_isa or [torch_facts.get("cpu_isa")]) if level}
    doc["targets"] = report.check_targets(doc)
    if args.dry_run:
        print(report.markdown(doc))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device}_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(report.markdown(doc))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plots:
        from . import plot

        written += plot.plot_results(doc, stem)
    print(report.markdown(doc))
    log("wrote " + ", ".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p) for p in written))
    return 0
