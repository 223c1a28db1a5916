"""results.json and results.md of ``benchmarks/gpu_check.sh``, rewritten after every step and every row.

One JSON document holds everything the GPU run measured, in sections, each written by the step that
measured it:

  machine    the preflight's facts (benchmarks/gpu_preflight.py): GPU, SMs, driver, clocks, torch,
             nvcc, compiler, commit and source hash
  steps      one entry per step of the script: name, status (ok / failed / timeout / skipped),
             seconds, one line
  tests      the GPU tests (test_cuda.log): counts, failed tests, the 15 slowest (from pytest -v --durations=15)
  sanitizer  compute-sanitizer memcheck / racecheck of the small cases: errors or hazards found
  precision  benchmarks/precision.py's errors of each float32 matmul precision
  bench      benchmarks/gpu_bench.py's rows (in the order measured) and targets
  ncu        the ncu profile of the forward tile kernel: occupancy, shared memory, tensor pipe, stalls

Every write replaces both files atomically (a temporary file, then os.replace), so a run killed at
any moment leaves the last complete state. Imports no torch: the script calls it between steps.

    python -m benchmarks.gpu_results --out DIR init --command CMD --budget-s S
    python -m benchmarks.gpu_results --out DIR machine FACTS.json
    python -m benchmarks.gpu_results --out DIR step NAME STATUS SECONDS LINE
    python -m benchmarks.gpu_results --out DIR tests PYTEST_LOG
    python -m benchmarks.gpu_results --out DIR sanitizer TOOL LOG EXIT_CODE
    python -m benchmarks.gpu_results --out DIR section NAME FILE.json
    python -m benchmarks.gpu_results --out DIR ncu CSV EXIT_CODE
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import sys

JSON_NAME, MD_NAME = "results.json", "results.md"


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load(out):
    """The document in ``out``, or a new one."""
    try:
        with open(os.path.join(out, JSON_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"command": None, "started_utc": _now(), "machine": {}, "steps": []}


def _replace(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(out, doc):
    """Rewrites results.json and results.md in ``out`` (each atomically)."""
    os.makedirs(out, exist_ok=True)
    doc["updated_utc"] = _now()
    _replace(os.path.join(out, JSON_NAME), json.dumps(doc, indent=1) + "\n")
    _replace(os.path.join(out, MD_NAME), markdown(doc))


def update(out, **sections):
    doc = load(out)
    doc.update(sections)
    save(out, doc)
    return doc


# -- parsers of the steps' logs --------------------------------------------------------------------
def parse_pytest(text):
    """Counts, failed test ids and the slowest durations of a ``pytest -v --durations=N`` log."""
    result = {"counts": {}, "failed": [], "slowest": [], "last_started": None}
    for line in text.splitlines():
        m = re.match(r"^(\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))?", line)
        if m and "::" in m.group(1) and not line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):
            result["last_started"] = m.group(1)
        m = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if m:
            result["failed"].append(m.group(2))
        m = re.match(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", line)
        if m:
            result["slowest"].append({"seconds": float(m.group(1)), "phase": m.group(2), "test": m.group(3)})
    summary = [line for line in text.splitlines() if re.match(r"^=+ .*\d+ (passed|failed|skipped|error)", line)]
    if summary:
        result["summary"] = summary[-1].strip("= ")
        for count, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary[-1]):
            result["counts"][what.rstrip("s") if what.startswith("error") else what] = int(count)
    return result


def parse_sanitizer(text, exit_code):
    """Errors / hazards a compute-sanitizer run reported, from its summary line."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    race = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    cases = re.findall(r"^case (\S+) ok", text, re.MULTILINE)
    out = {"exit_code": exit_code, "cases_ok": cases}
    if race:
        out.update(hazards=int(race.group(1)), errors=int(race.group(2)), warnings=int(race.group(3)))
    elif m:
        out["errors"] = int(m.group(1))
    if exit_code == 124 or exit_code == 137:
        out.update(status="timeout", line=f"no result within its time box (cases finished: {', '.join(cases) or 'none'})")
    elif out.get("errors") is None:  # the tool did not run the program to its end: the device does not allow it
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        out.update(status="skipped", line=f"no sanitizer summary (exit code {exit_code}): {tail[0][:300]}")
    elif out["errors"] or exit_code:
        why = "" if out["errors"] else ", a case failed: sanitizer.log"
        out.update(status="failed", line=(race.group(0) if race else m.group(0)) + f" (exit code {exit_code}{why})")
    else:
        out.update(status="ok", line=(race.group(0) if race else m.group(0)) + f"; cases: {', '.join(cases) or 'none'}")
    return out


# ncu metrics reported: achieved / theoretical occupancy, shared memory, tensor pipes, stall reasons.
NCU_KEYS = {
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", "Achieved Occupancy"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", "Theoretical Occupancy"),
    "registers_per_thread": ("launch__registers_per_thread", "Registers Per Thread"),
    "shared_memory_per_block": ("launch__shared_mem_per_block_dynamic", "Dynamic Shared Memory Per Block"),
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "Compute (SM) Throughput"),
    "memory_throughput_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "Memory Throughput"),
    "duration": ("gpu__time_duration.sum", "Duration"),
}


def _ncu_records(text):
    """{kernel index: {metric name: value}} from ncu's --csv output, either page: details (one row per
    metric: ..., "Metric Name", "Metric Unit", "Metric Value") or raw (one row per kernel, a column
    per metric, a row of units under the header)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return {}
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header, body = rows[0], rows[1:]
    kernels = {}
    if "Metric Name" in header:
        col = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
        for row in body:
            entry = kernels.setdefault(row[col["ID"]], {"kernel": row[col["Kernel Name"]]})
            entry[row[col["Metric Name"]]] = row[col["Metric Value"]]
        return kernels
    if body and not body[0][0].strip().isdigit():
        body = body[1:]  # the units row
    for row in body:
        entry = dict(zip(header, row))
        kernels[entry.get("ID", str(len(kernels)))] = {"kernel": entry.get("Kernel Name", "?"), **entry}
    return kernels


def _number(value):
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return value


def parse_ncu(text):
    """Per profiled kernel: the metrics of NCU_KEYS, every shared-memory and tensor-pipe metric, and the
    six largest stall reasons (warp cycles stalled per issued instruction)."""
    out = []
    for _, metrics in sorted(_ncu_records(text).items(), key=lambda kv: str(kv[0])):
        entry = {"kernel": metrics.get("kernel", "?")[:200]}
        for key, names in NCU_KEYS.items():
            for name in names:
                if name in metrics and metrics[name] not in ("", "n/a"):
                    entry[key] = _number(metrics[name])
                    break
        entry["shared_memory"] = {k: _number(v) for k, v in metrics.items()
                                  if "shared" in k and ("pct" in k or "bank_conflict" in k or "wavefronts" in k
                                                        or "Bank" in k)}
        entry["tensor_pipe"] = {k: _number(v) for k, v in metrics.items() if "tensor" in k.lower() and "pct" in k}
        stalls = {}
        for k, v in metrics.items():
            m = re.match(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$", k) or \
                re.match(r"smsp__average_warp_latency_issue_stalled_(\w+?)\.ratio$", k)
            if m and isinstance(_number(v), float):
                stalls[m.group(1)] = _number(v)
        entry["stalls_per_issue"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:6])
        out.append(entry)
    return out


# -- markdown ---------------------------------------------------------------------------------------
HEADER = ("| op | m | n | peer | precision | arithmetic | ms | bound ms | useful TFLOP/s | extra peak GiB | compile s | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    """One benchmark row as a Markdown table row (HEADER's columns)."""
    ms = "-" if r.get("time_s") is None else f"{1e3 * r['time_s']:.3f}"
    bound = "-" if r.get("bound_s") is None else f"{1e3 * r['bound_s']:.3f}"
    tf = "-" if r.get("tflops") is None else f"{r['tflops']:.3f}"
    gib = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.3f}"
    comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
    precision = r["dtype"] if r.get("dtype", "float32") != "float32" or r["op"] == "lock_mine" else r["precision"]
    note = str(r.get("note", "")).replace("|", "/")
    return (f"| {r['op']} | {r['m']} | {r['n']} | {r['peer']} | {precision} | {r.get('arithmetic') or '-'} | {ms} | "
            f"{bound} | {tf} | {gib} | {comp} | {note} |")


def _ok_rows(rows, **match):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def comparisons(rows):
    """Per peer row: fused time / peer time at the same precision, and fused rate / torch.mm rate."""
    gemm = {r["precision"]: r["tflops"] for r in _ok_rows(rows, op="gemm", dtype="float32")}
    fused = {(r["op"], r["m"], r["n"], r["precision"]): r for r in _ok_rows(rows, peer="fused", dtype="float32")}
    lines = ["| op | m | n | peer | precision | peer ms | fused ms (same precision) | fused speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in _ok_rows(rows):
        if r["peer"] in ("fused", "gemm"):
            continue
        f = fused.get((r["op"], r["m"], r["n"], r["precision"]))
        if f:
            lines.append(f"| {r['op']} | {r['m']} | {r['n']} | {r['peer']} | {r['precision']} | {1e3 * r['time_s']:.3f} | "
                         f"{1e3 * f['time_s']:.3f} | {r['time_s'] / f['time_s']:.1f}x |")
    rate = ["| op | m | n | precision | fused useful TFLOP/s | torch.mm TFLOP/s | fraction |", "|---|---|---|---|---|---|---|"]
    for (op, m, n, p), f in fused.items():
        if p in gemm and op != "batch_hard":
            rate.append(f"| {op} | {m} | {n} | {p} | {f['tflops']:.3f} | {gemm[p]:.3f} | {f['tflops'] / gemm[p]:.1%} |")
    return "\n".join(lines), "\n".join(rate)


def bench_markdown(bench):
    """The benchmark's section: targets (with their arithmetic bounds), every row in the order measured,
    the comparisons."""
    rows = bench.get("rows", [])
    vs_peers, vs_gemm = comparisons(rows)
    targets = ["| target | precision | measured | result | arithmetic bound | detail |", "|---|---|---|---|---|---|"]
    for t in bench.get("targets", []):
        shown = {"x": "{:.1f}x", "fraction": "{:.1%}", "s": "{:.3f} s"}[t["unit"]]
        v, b = t.get("measured"), t.get("bound")
        targets.append(f"| {t['target']} | {t['precision']} | {'-' if v is None else shown.format(v)} | **{t['result']}** | "
                       f"{t.get('bound_detail') or ('-' if b is None else shown.format(b))} | {t['detail']} |")
    skipped = sum(1 for r in rows if r.get("status") == "skipped")
    return (f"## Benchmark (benchmarks/gpu_bench.py)\n\n`{bench.get('command')}` on {bench.get('device')}, "
            f"{bench.get('elapsed_s', 0):.0f} s of a {bench.get('budget_s', 0):.0f} s budget; {len(rows)} rows, "
            f"{skipped} skipped.\n\n"
            "precision = `torch.set_float32_matmul_precision` during the row. Fused: highest = FP32, high = 3xTF32, "
            "medium = TF32 (what the kernels are asked for); the reference, torch.compile and BatchHardMiner: "
            f"highest = FP32, high = TF32 in cuBLAS (as under medium). gemm: torch.mm of two {bench.get('gemm_size')}^2 "
            "matrices. Times are medians of the calls after one warm-up. bound ms: the fused row's useful FLOPs at "
            "the peak rate of its arithmetic (or, where unknown, at torch.mm's measured rate).\n\n"
            "### Targets (reported, not asserted)\n\n" + "\n".join(targets) + "\n\n"
            "### Every row, in the order measured\n\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n\n"
            "### Fused vs each peer at the same precision\n\n" + vs_peers + "\n\n"
            "### Fused useful FLOP rate vs torch.mm at the same precision\n\n" + vs_gemm + "\n")


def _fmt(v, spec=".3g"):
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def markdown(doc):
    m = doc.get("machine") or {}
    smi = m.get("nvidia_smi") or {}
    nvcc = m.get("nvcc") or {}
    lines = [
        "# pddm_ext on a GPU: `make gpu-check`",
        "",
        f"`{doc.get('command') or '?'}`, started {doc.get('started_utc')}, updated {doc.get('updated_utc')}"
        + (f", budget {doc['budget_s']:.0f} s" if doc.get("budget_s") else "") + ".",
        "",
        f"- device: {m.get('gpu', m.get('device', '?'))}, {m.get('sms', '?')} SMs, compute capability "
        f"{m.get('capability', '?')}, {(m.get('gpu_memory_bytes') or 0) / 2**30:.0f} GiB",
        f"- driver {smi.get('driver_version', '?')}; SM clock {smi.get('clocks_sm', '?')} MHz (max "
        f"{smi.get('clocks_max_sm', '?')}), memory clock {smi.get('clocks_mem', '?')} MHz; throttle reasons "
        f"{smi.get('clocks_event_reasons_active', '?')}",
        f"- torch {m.get('torch', '?')} (CUDA {m.get('torch_cuda', '?')}), nvcc {nvcc.get('version', '?')}, "
        f"Python {m.get('python', '?')}, {m.get('cpu_count', '?')} cores",
        f"- commit {m.get('commit') or 'unknown'}, sources {m.get('tree_hash', '?')}"
        + (" (uncommitted changes)" if m.get("dirty") else ""),
        "",
        "## Steps",
        "",
        "| step | status | s | |",
        "|---|---|---|---|",
    ]
    for s in doc.get("steps", []):
        lines.append(f"| {s['name']} | **{s['status']}** | {_fmt(s.get('seconds'), '.0f')} | "
                     f"{str(s.get('line', '')).replace('|', '/')} |")
    tests = doc.get("tests")
    if tests:
        lines += ["", "## CUDA tests", "", f"{tests.get('summary', 'no summary line (killed?)')}; last test started: "
                  f"`{tests.get('last_started')}`"]
        if tests.get("failed"):
            lines += ["", "Failed: " + ", ".join(f"`{t}`" for t in tests["failed"])]
        if tests.get("slowest"):
            lines += ["", "Slowest: " + ", ".join(f"`{t['test']}` {t['seconds']:.1f} s ({t['phase']})"
                                                  for t in tests["slowest"][:15])]
    if doc.get("sanitizer"):
        lines += ["", "## compute-sanitizer", "", "| tool | status | |", "|---|---|---|"]
        for tool, r in doc["sanitizer"].items():
            lines.append(f"| {tool} | **{r.get('status')}** | {str(r.get('line', '')).replace('|', '/')} |")
    bench = doc.get("bench")
    if bench:
        lines += ["", bench_markdown(bench)]
    precision = doc.get("precision")
    if precision and precision.get("markdown"):
        lines += ["", "## Error of each float32 matmul precision (benchmarks/precision.py)", "", precision["markdown"]]
    ncu = doc.get("ncu")
    if ncu:
        lines += ["", "## ncu: the forward tile kernel at m = 4096", "", f"{ncu.get('line', '')}"]
        for k in ncu.get("kernels", []):
            stalls = ", ".join(f"{name} {v:.2f}" for name, v in k.get("stalls_per_issue", {}).items())
            lines += ["", f"- `{k['kernel'][:120]}`: achieved occupancy {_fmt(k.get('achieved_occupancy_pct'))}% "
                      f"(theoretical {_fmt(k.get('theoretical_occupancy_pct'))}%), {_fmt(k.get('registers_per_thread'))} "
                      f"registers, SM throughput {_fmt(k.get('sm_throughput_pct'))}%, memory throughput "
                      f"{_fmt(k.get('memory_throughput_pct'))}%, duration {_fmt(k.get('duration'))}",
                      f"  - tensor pipe: {json.dumps(k.get('tensor_pipe', {}))}",
                      f"  - shared memory: {json.dumps(k.get('shared_memory', {}))}",
                      f"  - stalls (warp cycles per issued instruction): {stalls or '-'}"]
    return "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("init")
    p.add_argument("--command", required=True)
    p.add_argument("--budget-s", type=float, required=True)
    sub.add_parser("machine").add_argument("file")
    p = sub.add_parser("step")
    for name in ("name", "status", "seconds", "line"):
        p.add_argument(name)
    sub.add_parser("tests").add_argument("log")
    p = sub.add_parser("sanitizer")
    for name in ("tool", "log", "exit_code"):
        p.add_argument(name)
    p = sub.add_parser("section")
    p.add_argument("name")
    p.add_argument("file")
    p = sub.add_parser("ncu")
    p.add_argument("csv")
    p.add_argument("exit_code")
    args = ap.parse_args(argv)

    def read(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    if args.what == "init":
        doc = {"command": args.command, "started_utc": _now(), "budget_s": args.budget_s, "machine": {}, "steps": []}
        save(args.out, doc)
        return 0
    doc = load(args.out)
    if args.what == "machine":
        doc["machine"] = json.loads(read(args.file) or "{}")
    elif args.what == "step":
        doc.setdefault("steps", []).append({"name": args.name, "status": args.status, "seconds": float(args.seconds),
                                            "line": args.line})
    elif args.what == "tests":
        doc["tests"] = parse_pytest(read(args.log))
    elif args.what == "sanitizer":
        doc.setdefault("sanitizer", {})[args.tool] = parse_sanitizer(read(args.log), int(args.exit_code))
        print(f"{args.tool}: {doc['sanitizer'][args.tool]['status']}: {doc['sanitizer'][args.tool]['line']}")
    elif args.what == "section":
        text = read(args.file)
        doc[args.name] = json.loads(text) if text else {"error": f"{args.file} missing"}
    elif args.what == "ncu":
        text, code = read(args.csv), int(args.exit_code)
        kernels = parse_ncu(text)
        if kernels:
            line = f"{len(kernels)} launch(es) profiled"
        elif "ERR_NVGPUCTRPERM" in text:
            line = "no permission to the GPU performance counters here (ERR_NVGPUCTRPERM)"
        else:
            line = f"no kernel profiled (exit code {code}): " + " / ".join(
                line for line in text.splitlines()[-3:] if line.strip())[:300]
        doc["ncu"] = {"exit_code": code, "kernels": kernels, "line": line}
        print(f"ncu: {line}")
    save(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
