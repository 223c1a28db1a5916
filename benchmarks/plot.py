"""Plots of a results document: time vs m and extra peak memory vs m, log-log, one line per variant.

    python -m benchmarks.plot benchmarks/results/cpu_quick.json   # redraw the PNGs

One PNG per quantity and d (``<stem>_time_d128.png``, ``<stem>_memory_d128.png``), one panel per
workload. The bank workload has a single size and lives in the table only. Needs matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import VARIANT_TITLES, primary
from .workloads import BANK_WORKLOADS, WORKLOADS

STYLE = {"fused": ("tab:blue", "o"), "reference": ("tab:red", "s"), "compiled": ("tab:green", "^"), "pml": ("tab:purple", "D")}
MEMORY_FLOOR_MB = 0.1  # a log axis cannot show 0: smaller extra peaks are drawn here


def _series(doc, d):
    """{workload: {variant: [(m, seconds, megabytes), ...]}} of the finished configurations."""
    data = {}
    for entry in doc["results"]:
        c = entry["config"]
        if c["d"] != d or entry.get("status") != "ok" or c["workload"] in BANK_WORKLOADS or not primary(doc, entry):
            continue  # a run timing several ISA levels plots its first
        point = (c["m"], entry["time_s"], max(entry["extra_peak_bytes"] / 2**20, MEMORY_FLOOR_MB))
        data.setdefault(c["workload"], {}).setdefault(c["variant"], []).append(point)
    return data


def plot_results(doc, stem):
    """Writes the PNGs next to ``stem``; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    stem = Path(stem)
    written = []
    for d in sorted({e["config"]["d"] for e in doc["results"]}):
        data = _series(doc, d)
        workloads = [w for w in WORKLOADS if w in data]
        if not workloads:
            continue
        for quantity, column, ylabel in (("time", 1, "time per call (s)"), ("memory", 2, "extra peak memory (MB)")):
            ncols = min(3, len(workloads))
            nrows = -(-len(workloads) // ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.4), squeeze=False)
            for ax in axes.flat[len(workloads):]:
                ax.set_visible(False)
            for ax, workload in zip(axes.flat, workloads):
                for variant, points in sorted(data[workload].items(), key=lambda kv: list(STYLE).index(kv[0])):
                    points.sort()
                    color, marker = STYLE[variant]
                    ax.plot([p[0] for p in points], [p[column] for p in points], marker=marker, color=color,
                            label=VARIANT_TITLES[variant])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(workload)
                ax.set_xlabel("m (rows in the batch)")
                ax.grid(True, which="both", alpha=0.3)
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=8)
            fig.suptitle(f"pddm_ext {doc['device']}, d=h=c={d}: {doc['machine'].get('cpu_model', '')}, "
                         f"{doc['machine'].get('usable_cores')} cores", fontsize=10)
            fig.tight_layout()
            path = stem.parent / f"{stem.name}_{quantity}_d{d}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv):
    path = Path(argv[1])
    for p in plot_results(json.loads(path.read_text()), path.with_suffix("")):
        print(p)


if __name__ == "__main__":
    main(sys.argv)
