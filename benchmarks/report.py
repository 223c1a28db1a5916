"""Markdown tables and the speed / memory target checks from a results document.

    python -m benchmarks.report benchmarks/results/cpu_quick.json   # reprint / rewrite the .md

A target is PASS or FAIL with the measured number, or NOT MEASURED (with why) when its
configuration was not part of the run or did not finish. Nothing here rounds a FAIL into a PASS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import machine
from .workloads import BANK_WORKLOADS, WORKLOADS, Config, useful_flops

VARIANT_TITLES = {"fused": "fused", "reference": "reference", "compiled": "compiled", "pml": "BatchHardMiner"}
MB = 2**20


def fmt_time(seconds):
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(nbytes):
    if nbytes is None:
        return "—"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GB"
    return f"{nbytes / MB:.1f} MB"


def describe_entry(entry):
    """One line for the progress log."""
    status = entry.get("status")
    if status != "ok":
        return f"{status}: {entry.get('error', '')}"
    text = f"{fmt_time(entry['time_s'])} (median of {len(entry['times_s'])}), extra peak {fmt_bytes(entry['extra_peak_bytes'])}"
    if "compile_s" in entry:
        text += f", compile {entry['compile_s']:.1f} s"
    if entry.get("phases_s"):
        text += ", " + ", ".join(f"{k} {fmt_time(v)}" for k, v in entry["phases_s"].items())
    return text


def isa_levels(doc):
    """The levels the fused configurations ran at, in run order (one or none: a single-level run)."""
    levels = []
    for entry in doc["results"]:
        if entry.get("cpu_isa") and entry["cpu_isa"] not in levels:
            levels.append(entry["cpu_isa"])
    return levels


def primary(doc, entry):
    """Whether an entry counts for the targets and plots: a run's fused configurations at its first level."""
    levels = isa_levels(doc)
    return len(levels) < 2 or entry.get("cpu_isa") in (None, levels[0])


def variant_key(doc, entry):
    """The column of an entry: its variant, with the level where the run timed several ("fused@avx2")."""
    variant = entry["config"]["variant"]
    return f"{variant}@{entry['cpu_isa']}" if len(isa_levels(doc)) > 1 and entry.get("cpu_isa") else variant


def variant_title(key):
    variant, _, level = key.partition("@")
    return VARIANT_TITLES[variant] + (f" at {level}" if level else "")


def find(doc, workload, variant, m=None, d=128):
    for entry in doc["results"]:
        c = entry["config"]
        if (c["workload"] == workload and c["variant"] == variant and c["d"] == d and (m is None or c["m"] == m)
                and primary(doc, entry)):
            return entry
    return None


def _ok(entry):
    return entry is not None and entry.get("status") == "ok"


def _why_missing(entry, name):
    if entry is None:
        return f"{name} not in this run"
    return f"{name}: {entry.get('status')} ({entry.get('error', '')})"


def gflops(entry):
    return useful_flops(Config(**entry["config"])) / entry["time_s"] / 1e9


def gemm_peak(doc):
    """The roofline denominator: the best torch.mm rate seen in the run (at its start and in every
    fused configuration's process, right after its timed calls). On a shared machine a GEMM timed
    at an unlucky moment would flatter the kernel; the best rate never does."""
    rates = [doc.get("gemm", {}).get("gflops")] + [e.get("gemm_gflops_here") for e in doc["results"]]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def fma_peak(doc, level=None):
    """The CPU's FMA-peak estimate (GFLOP/s; None where unknown) at ``level``, else at the level the run's
    kernels ran at."""
    if level and (doc.get("peaks") or {}).get(level):
        return doc["peaks"][level]["gflops"]
    return (doc.get("peak") or {}).get("gflops")


def rate_shares(rate, doc, level=None):
    """'(61% of GEMM, 35% of peak)' for a rate in GFLOP/s, each share where its denominator is known."""
    shares = [f"{100 * rate / denominator:.0f}% of {name}"
              for name, denominator in (("GEMM", gemm_peak(doc)), ("peak", fma_peak(doc, level))) if denominator]
    return f" ({', '.join(shares)})" if shares else ""


def check_targets(doc):
    """Each target as {issue, target, measured, result} (``issue``: the label of the requirement it checks)."""
    gemm = gemm_peak(doc)
    checks = []

    def add(issue, target, result, measured):
        checks.append({"issue": issue, "target": target, "result": result, "measured": measured})

    def speedup(issue, workload, m, slower_variant, factor, d=128):
        fused, other = find(doc, workload, "fused", m, d), find(doc, workload, slower_variant, m, d)
        title = VARIANT_TITLES[slower_variant]
        size = f"N={m} d={d}" if workload == "batch_hard" else f"m={m} d=h=c={d}"
        target = f"{workload} {size}: fused >= {factor}x faster than {title}"
        if not (_ok(fused) and _ok(other)):
            why = _why_missing(fused, "fused") if not _ok(fused) else _why_missing(other, title)
            add(issue, target, "NOT MEASURED", why)
            return
        ratio = other["time_s"] / fused["time_s"]
        add(issue, target, "PASS" if ratio >= factor else "FAIL",
            f"{ratio:.1f}x ({fmt_time(other['time_s'])} vs {fmt_time(fused['time_s'])})")

    def memory_below(issue, workload, m, limit_bytes, d=128, variant="fused"):
        entry = find(doc, workload, variant, m, d)
        size = f"{m} x 65,536 " if workload in BANK_WORKLOADS else f"m={m} "
        target = f"{workload} {size}d={d}: {variant} extra peak memory < {limit_bytes // MB} MB"
        if not _ok(entry):
            add(issue, target, "NOT MEASURED", _why_missing(entry, variant))
            return
        extra = entry["extra_peak_bytes"]
        add(issue, target, "PASS" if extra < limit_bytes else "FAIL", fmt_bytes(extra))

    speedup("2", "mine_k1", 512, "reference", 5)
    memory_below("2", "mine_k1", 2048, 64 * MB)
    speedup("5", "mine_k1", 1024, "reference", 10)
    speedup("5", "mine_k1", 1024, "compiled", 3)

    fused = find(doc, "mine_k1", "fused", 1024)
    target = "mine_k1 m=1024 d=h=c=128: fused >= 50% of the measured GEMM rate (useful FLOPs)"
    if _ok(fused) and gemm:
        rate = gflops(fused)
        add("2, 5", target, "PASS" if rate >= 0.5 * gemm else "FAIL",
            f"{rate:.0f} GFLOP/s = {100 * rate / gemm:.0f}% of torch.mm {gemm:.0f} GFLOP/s")
    else:
        add("2, 5", target, "NOT MEASURED", _why_missing(fused, "fused") if not _ok(fused) else "no GEMM rate")

    speedup("5", "batch_hard", 8192, "pml", 5)
    fused, pml = find(doc, "batch_hard", "fused", 8192), find(doc, "batch_hard", "pml", 8192)
    target = "batch_hard N=8192 d=128: fused extra peak memory <= 1/10 of BatchHardMiner's"
    if _ok(fused) and _ok(pml):
        ratio = pml["extra_peak_bytes"] / max(fused["extra_peak_bytes"], 1)
        add("5", target, "PASS" if fused["extra_peak_bytes"] * 10 <= pml["extra_peak_bytes"] else "FAIL",
            f"{fmt_bytes(fused['extra_peak_bytes'])} vs {fmt_bytes(pml['extra_peak_bytes'])} ({ratio:.0f}x less)")
    else:
        add("5", target, "NOT MEASURED", _why_missing(fused, "fused") if not _ok(fused) else _why_missing(pml, "BatchHardMiner"))
    memory_below("5", "bank_mine", 256, 100 * MB)

    fused, ref = find(doc, "scores_fwd_bwd", "fused", 1024), find(doc, "scores_fwd_bwd", "reference", 1024)
    target = "unit(x).sum().backward() m=1024 d=h=c=128: fused vs reference autograd (time)"
    if _ok(fused) and _ok(ref):
        add("3", target, "INFO", f"{ref['time_s'] / fused['time_s']:.1f}x faster ({fmt_time(ref['time_s'])} vs {fmt_time(fused['time_s'])}); "
            f"reference extra peak {fmt_bytes(ref['extra_peak_bytes'])}")
    else:
        add("3", target, "NOT MEASURED", _why_missing(fused, "fused") if not _ok(fused) else _why_missing(ref, "reference"))
    memory_below("3", "scores_fwd_bwd", 1024, 200 * MB)
    memory_below("3", "bank_fwd_bwd", 64, 200 * MB)
    target = "unit(x).sum().backward() m=1024 d=h=c=128: fused backward <= 3x fused forward"
    if _ok(fused) and {"forward", "backward"} <= set(fused.get("phases_s", {})):
        fwd, bwd = fused["phases_s"]["forward"], fused["phases_s"]["backward"]
        add("3", target, "PASS" if bwd <= 3 * fwd else "FAIL", f"{bwd / fwd:.2f}x ({fmt_time(bwd)} vs {fmt_time(fwd)})")
    else:
        add("3", target, "NOT MEASURED", _why_missing(fused, "fused"))
    sparse = find(doc, "scores_bwd_positives", "fused", 1024)
    target = "(unit(x) * same_class).sum().backward() m=1024: fused backward / forward (0.2% of dS nonzero)"
    if _ok(sparse) and {"forward", "backward"} <= set(sparse.get("phases_s", {})):
        fwd, bwd = sparse["phases_s"]["forward"], sparse["phases_s"]["backward"]
        add("3", target, "INFO", f"{bwd / fwd:.2f}x ({fmt_time(bwd)} vs {fmt_time(fwd)})")
    else:
        add("3", target, "NOT MEASURED", _why_missing(sparse, "fused"))
    return checks


def _cell_time(entry):
    if entry is None:
        return ""
    if entry.get("status") == "skipped":
        return entry["error"].split(" (")[0]  # "needs X GB"
    if entry.get("status") != "ok":
        return entry.get("status", "?")
    text = fmt_time(entry["time_s"])
    if len(entry.get("times_s", ())) < 3:
        text += f" ({len(entry['times_s'])} calls)"
    if "compile_s" in entry:
        text += f" (+{entry['compile_s']:.0f} s compile)"
    return text


def _groups(doc):
    """Results grouped by (workload, d, m, n) in workload order, then d, then m."""
    groups = {}
    for entry in doc["results"]:
        c = entry["config"]
        groups.setdefault((c["workload"], c["d"], c["m"], c["n"]), {})[variant_key(doc, entry)] = entry
    order = {w: i for i, w in enumerate(WORKLOADS)}
    return sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2]))


def results_table(doc):
    """One row per (workload, size, d); each variant's cell is "time · extra peak memory"."""
    gemm = gemm_peak(doc)
    keys = []
    for entry in doc["results"]:
        if variant_key(doc, entry) not in keys:
            keys.append(variant_key(doc, entry))
    order = {v: i for i, v in enumerate(VARIANT_TITLES)}
    variants = sorted(keys, key=lambda k: order[k.partition("@")[0]])  # stable: the levels in run order
    fused_keys = [v for v in variants if v.partition("@")[0] == "fused"]
    head = ["workload", "m × n", "d=h=c"] + [f"{variant_title(v)}: time · extra peak" for v in variants]
    head += ["fused is faster by", "fused GFLOP/s (% of GEMM, % of FMA peak)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (workload, d, m, n), by_variant in _groups(doc):
        fused = by_variant.get(fused_keys[0]) if fused_keys else None
        row = [f"`{workload}`", f"{m} × {n}", str(d)]
        for v in variants:
            entry = by_variant.get(v)
            cell = _cell_time(entry)
            if _ok(entry):
                cell += f" · {fmt_bytes(entry['extra_peak_bytes'])}"
            row.append(cell)
        speedups = [
            f"{by_variant[v]['time_s'] / fused['time_s']:.1f}× vs {variant_title(v)}"
            for v in variants if _ok(fused) and v != fused_keys[0] and _ok(by_variant.get(v))
        ]
        row.append(", ".join(speedups))
        rates = []
        for v in fused_keys:
            if _ok(by_variant.get(v)):
                rate = gflops(by_variant[v])
                level = by_variant[v].get("cpu_isa")
                rates.append((f"{level}: " if len(fused_keys) > 1 else "") + f"{rate:.0f}{rate_shares(rate, doc, level)}")
        row.append("; ".join(rates))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


_PHASE_LOSSES = {
    "scores_fwd_bwd": "`S.sum()`",
    "scores_bwd_positives": "`(S * same_class).sum()`",
    "bank_fwd_bwd": "`unit(x, bank).sum()`",
}


def phases_table(doc):
    rows = []
    for entry in doc["results"]:
        c = entry["config"]
        if _ok(entry) and entry.get("phases_s"):
            fwd, bwd = entry["phases_s"]["forward"], entry["phases_s"]["backward"]
            loss = _PHASE_LOSSES.get(c["workload"], c["workload"])
            rows.append(f"| {loss} | {variant_title(variant_key(doc, entry))} | {c['m']} | {c['d']} | {fmt_time(fwd)} | {fmt_time(bwd)} | {bwd / fwd:.2f} |")
    if not rows:
        return ""
    head = "| loss | variant | m | d=h=c | forward | backward | backward ÷ forward |\n|---|---|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


def _code_line(code):
    if not code:
        return ""
    text = f"; code {code.get('git_commit', '?')}" + (" with modified csrc/" if code.get("csrc_modified") else "")
    if code.get("extension_sha256"):
        text += f", extension sha256 {code['extension_sha256']} built {code.get('extension_mtime_utc')}"
    if code.get("rebuilt_during_run"):
        text += f" (**rebuilt during the run, at {code['rebuilt_during_run']}: the results mix two builds**)"
    return text


def markdown(doc):
    m = doc["machine"]
    gemm = doc.get("gemm", {})
    s = doc["settings"]
    out = [
        f"# pddm_ext benchmarks: `{doc['command']}`",
        "",
        f"- Machine: {machine.one_line(m)}; load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end.",
        f"- Run: {doc['started_utc']} → {doc['finished_utc']}, device `{doc['device']}`, float32{_code_line(doc.get('code'))}.",
    ]
    if gemm.get("status") == "ok":
        here = [e["gemm_gflops_here"] for e in doc["results"] if e.get("gemm_gflops_here")]
        spread = f" ({min(here):.0f}–{max(here):.0f} in the fused configurations' processes)" if here else ""
        out.append(f"- GEMM roofline: `torch.mm` {gemm['size']}² {gemm['dtype']}: {gemm['gflops']:.0f} GFLOP/s at the start of the run"
                   f"{spread}; \"% of GEMM\" divides by the best of these, {gemm_peak(doc):.0f} GFLOP/s"
                   + (f" ({100 * gemm_peak(doc) / fma_peak(doc):.0f}% of the FMA peak)." if fma_peak(doc) else "."))
    cpu = m.get("cpu") or {}
    peaks = {level: p for level, p in (doc.get("peaks") or {}).items() if p} or ({None: doc["peak"]} if doc.get("peak") else {})
    if peaks:
        listed = "; ".join((f"{level}: " if len(peaks) > 1 else "") + f"{p['formula']} = {p['gflops']:.0f} GFLOP/s" for level, p in peaks.items())
        out.append(f"- FMA peak estimate at the kernels' level{'s' if len(peaks) > 1 else ''}: {listed} "
                   f"(family and model: {cpu.get('source')}; FMA units: {cpu.get('fma_source')}; clock: {cpu.get('clock_source')}).")
    if len(isa_levels(doc)) > 1:
        out.append(f"- The fused configurations ran once per level ({', '.join(isa_levels(doc))}: PDDM_EXT_CPU_ISA), one after "
                   "the other in the same run; the targets and plots use the first level.")
    elif doc["device"] == "cpu" and "peak" in doc:
        out.append("- FMA peak: not estimated (micro-architecture, clock or the kernels' level unknown on this CPU).")
    out += [
        f"- Each configuration in a fresh process: 1 warm-up call, then the median of {s['min_repeats']}–{s['max_repeats']} timed calls "
        f"(a first call slower than {s.get('slow_call_s', float('inf')):.0f} s is timed too and 2 calls suffice); "
        "extra peak memory = peak RSS of the calls after the warm-up minus RSS before them (CPU) or `torch.cuda.max_memory_allocated` "
        "minus allocated before them (CUDA). Compile time (cold TorchInductor cache, includes the first call) is excluded from "
        f"the per-call time. Configurations predicted above {fmt_bytes(s['memory_budget_bytes'])} are skipped (\"needs X GB\").",
        "- Useful FLOPs: PDDM batch mode m(m+1)/2 · 2(h·d + 2h·c), reference mode m·n · 2(h·d + 2h·c), ×3 for "
        "forward+backward; Euclidean m(m+1)/2 · 2d.",
    ]
    loads = [(m.get(key) or [0])[0] for key in ("load_average_start", "load_average_end")]
    cores = m.get("usable_cores") or 1
    if max(loads) > 1.5 * cores:
        out.append(f"- **Warning**: the machine was shared during this run (1-minute load average up to {max(loads):.0f} "
                   f"on {cores} cores): absolute times are inflated and ratios noisy. Re-run on an idle machine.")
    out += [
        "",
        "## Targets",
        "",
        "| issue | target | measured | result |",
        "|---|---|---|---|",
    ]
    for t in doc.get("targets", []):
        out.append(f"| {t['issue']} | {t['target']} | {t['measured']} | **{t['result']}** |")
    gemm_rate = gemm_peak(doc)
    above = [e for e in doc["results"] if _ok(e) and e["config"]["variant"] == "fused" and gemm_rate and gflops(e) > gemm_rate]
    if above:
        out += ["", f"Note: {len(above)} fused configuration(s) exceed the torch.mm rate (up to {max(gflops(e) for e in above):.0f} GFLOP/s): "
                "torch.mm is not at this CPU's peak (its BLAS may not use the widest vector units here, e.g. AVX-512), "
                "so the hardware roofline is higher than the column's denominator."]
    out += ["", "## Results", "", results_table(doc), ""]
    phases = phases_table(doc)
    if phases:
        out += ["## Forward and backward of a loss on `S = unit(x)`", "", phases, ""]
    failures = [e for e in doc["results"] if e.get("status") not in ("ok", "skipped", "planned")]
    if failures:
        out += ["## Configurations that did not finish", ""]
        for e in failures:
            out.append(f"- {Config(**e['config']).label()}: {e.get('status')}: {e.get('error', '')}")
        out.append("")
    return "\n".join(out)


def main(argv):
    path = Path(argv[1])
    doc = json.loads(path.read_text())
    doc["targets"] = check_targets(doc)
    path.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main(sys.argv)
