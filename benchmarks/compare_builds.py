"""Two builds of the extension side by side, in one run: the same configurations timed alternately.

    python -m benchmarks.compare_builds --build before=/tmp/before --build after=/tmp/after \
        --levels avx2 avx512 --rounds 3 --out benchmarks/results/cpu_compare_builds.json

Each ``--build NAME=DIR`` is a directory holding an importable ``pddm_ext`` (its package files and its
built ``_C*.so``, e.g. a copy of the checkout's ``pddm_ext/`` before and after a change). Every round
times every configuration once per (build, level) pair, each in a fresh ``benchmarks.measure`` process
(the suite's own, PDDM_EXT_CPU_ISA set to the level, the process started in DIR so that its
``pddm_ext`` is the one imported), the pairs in turn, so that a machine shared with other work slows
them alike; the JSON keeps every round's median time and the median over rounds, with the torch.mm
rate each fused process measured right after its calls. Configurations: d = h = c = 128, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from . import machine
from .run import REPO_ROOT
from .workloads import make_config, useful_flops

CONFIGS = (("scores_fwd", 1024), ("mine_k1", 1024), ("scores_fwd_bwd", 1024), ("batch_hard", 8192))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_builds", description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, help="NAME=DIR (repeat: two or more)")
    p.add_argument("--levels", nargs="+", default=["avx2"], choices=("baseline", "avx2", "avx512"))
    p.add_argument("--skip", action="append", default=[], help="NAME:LEVEL pairs not to time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    builds = dict(b.split("=", 1) for b in args.build)
    pairs = [(name, level) for name in builds for level in args.levels if f"{name}:{level}" not in args.skip]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    facts = machine.describe()  # at the start (its load_average_start)
    rows = {}
    for rnd in range(args.rounds):
        for workload, m in CONFIGS:
            cfg = make_config(workload, "fused", m, 128)
            for name, level in pairs:
                directory = Path(builds[name]).resolve()
                env = dict(os.environ, PDDM_EXT_CPU_ISA=level,
                           PYTHONPATH=str(directory) + os.pathsep + str(REPO_ROOT))
                spec = {"config": cfg.to_dict(), "warmup": 1, "min_repeats": args.min_repeats,
                        "max_repeats": args.min_repeats, "budget_s": 0.0, "slow_s": float("inf"), "gemm_size": 2048}
                result = _run_in(directory, spec, args.timeout, env)
                row = rows.setdefault(f"{workload} m={m}", {}).setdefault(f"{name} at {level}", {"rounds": []})
                row["rounds"].append({k: result.get(k) for k in ("status", "error", "time_s", "phases_s", "gemm_gflops_here")})
                log(f"round {rnd + 1}: {workload} m={m} {name} at {level}: {result.get('time_s') or result.get('error')}")
    for config, by_pair in rows.items():
        workload, m = config.split(" m=")
        flops = useful_flops(make_config(workload, "fused", int(m), 128))
        for row in by_pair.values():
            times = [r["time_s"] for r in row["rounds"] if r.get("status") == "ok"]
            if times:
                row["median_s"] = statistics.median(times)
                row["gflops"] = flops / row["median_s"] / 1e9
                phases = [r["phases_s"] for r in row["rounds"] if r.get("phases_s")]
                if phases:
                    row["median_phases_s"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    command = "python -m benchmarks.compare_builds " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {"command": command, "machine": facts, "builds": builds, "levels": args.levels, "rounds": args.rounds,
           "load_average_end": machine.load_average(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for config, by_pair in rows.items():
        print(config + ": " + "; ".join(f"{pair} {row.get('median_s', float('nan')) * 1e3:.0f} ms"
                                         + (f" ({row['gflops']:.1f} GFLOP/s)" if "gflops" in row else "")
                                         for pair, row in by_pair.items()))
    return 0


def _run_in(directory, spec, timeout_s, env):
    """One benchmarks.measure process started in ``directory`` (first on sys.path: its pddm_ext is the one
    imported); its result dict, or the error."""
    cmd = [sys.executable, "-m", "benchmarks.measure", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"status": "crashed", "error": f"exit code {proc.returncode}: {proc.stderr[-500:]}"}

if __name__ == "__main__":
    sys.exit(main())
