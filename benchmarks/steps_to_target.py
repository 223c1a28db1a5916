"""Steps to a fixed Recall@1: how fast each loss and seed of a `pddm-ext compare` output gets there.

    python -m benchmarks.steps_to_target benchmarks/results/compare/finetune_icons \\
        --target 0.357 features --target 0.301 "raw pixels"

Reads ``<out>/results.json`` (written by ``pddm-ext compare`` or ``benchmarks.frozen_features``: every
run's per-epoch history is in it, so the committed file is enough) and writes
``<out>/steps_to_target.md``:

- per entry and seed: the final Recall@1, the best Recall@1 and the training steps after which it was
  reached, and for each target the training steps after which Recall@1 on the test classes first
  reached it (``>=``), or "not reached";
- per entry: how many seeds reached each target and their median steps.

Recall@1 is evaluated once per epoch, so steps are multiples of the batches per epoch (the resolution
of the answer). The paper's claim this measures: PDDM-mined quadruplets converge faster (Huang, Loy,
Tang, NIPS 2016, Sec. 4). With no ``--target``, the targets are the floors: when ``<out>/floor.json``
exists (the fine-tuning regime), its Recall@1 ("pretrained features") and results.json's floor row
("raw pixels"); otherwise results.json's floor row alone ("floor": raw pixels for ``compare``, the
pretrained features for ``frozen_features``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def first_step(history, target, batches_per_epoch):
    """Training steps after which ``recall@1 >= target`` first held, or None if it never did.

    history: the run's per-epoch list of dicts with "epoch" (1-based) and "recall@1" (float in [0, 1]).
    """
    epoch = next((h["epoch"] for h in history if h["recall@1"] >= target), None)
    return None if epoch is None else epoch * batches_per_epoch


def table(runs, targets, batches_per_epoch):
    """Markdown text of the two tables.

    runs: list of dicts with "entry" (loss name), "seed" and "history" (as in ``first_step``), in the
    order to print. targets: list of (Recall@1 in [0, 1], label). batches_per_epoch: int > 0.
    """
    if not targets:
        raise ValueError("targets: give at least one (Recall@1, label)")
    head = ["entry", "seed", "final Recall@1", "best Recall@1 (after steps)"]
    head += [f"steps to Recall@1 >= {t:.3f} ({label})" for t, label in targets]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reached = {}
    for run in runs:
        hist = run["history"]
        best = max(hist, key=lambda h: h["recall@1"])  # the first of equal bests
        cells = [run["entry"], str(run["seed"]), f"{hist[-1]['recall@1']:.4f}",
                 f"{best['recall@1']:.4f} ({best['epoch'] * batches_per_epoch})"]
        for t, label in targets:
            step = first_step(hist, t, batches_per_epoch)
            reached.setdefault((run["entry"], label), []).append(step)
            cells.append("not reached" if step is None else str(step))
        rows.append("| " + " | ".join(cells) + " |")

    summary_head = ["entry"] + [f"seeds reaching {t:.3f} ({label}); median steps" for t, label in targets]
    summary = ["| " + " | ".join(summary_head) + " |", "|" + "---|" * len(summary_head)]
    for entry in dict.fromkeys(run["entry"] for run in runs):
        cells = [entry]
        for _, label in targets:
            steps = reached[(entry, label)]
            hit = [s for s in steps if s is not None]
            cells.append(f"{len(hit)} of {len(steps)}" + (f"; {statistics.median(hit):g}" if hit else ""))
        summary.append("| " + " | ".join(cells) + " |")
    note = (f"Recall@1 on the test classes, evaluated every {batches_per_epoch} training steps (one epoch): "
            "steps are the first evaluation at or above the target.")
    return "\n".join(rows) + "\n\n" + "\n".join(summary) + "\n\n" + note + "\n"


def runs_of(summary):
    """The per-run histories of a compare results.json, entries in its order, seeds ascending."""
    return [dict(entry=entry, seed=run["seed"], history=run["history"])
            for entry, result in summary["losses"].items() for run in sorted(result["runs"], key=lambda r: r["seed"])]


def default_targets(out, summary):
    floor_json = os.path.join(out, "floor.json")
    if os.path.exists(floor_json):
        with open(floor_json) as f:
            features = json.load(f)["floor"]["recall@1"]
        return [(features, "pretrained features"), (summary["floor"]["recall@1"], "raw pixels")]
    return [(summary["floor"]["recall@1"], "floor")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a `pddm-ext compare` output folder (holds results.json), or that results.json")
    p.add_argument("--target", nargs=2, action="append", metavar=("RECALL_AT_1", "LABEL"),
                   help="a Recall@1 in [0, 1] and its name in the table; repeat for several "
                        "(default: the floor, see the module docstring)")
    args = p.parse_args(argv)
    if os.path.basename(args.out) == "results.json" and os.path.isfile(args.out):
        args.out = os.path.dirname(args.out) or "."
    path = os.path.join(args.out, "results.json")
    if not os.path.exists(path):
        p.error(f"out: {path} does not exist (run `pddm-ext compare --out {args.out}` first)")
    try:
        with open(path) as f:
            summary = json.load(f)
        runs, batches_per_epoch = runs_of(summary), summary["batch"]["batches_per_epoch"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        p.error(f"out: {path} is not a `pddm-ext compare` results.json ({type(exc).__name__}: {exc})")
    targets = []
    for value, label in args.target or []:
        if "|" in label:
            p.error(f"--target: the label {label!r} contains '|', which would break the Markdown table")
        try:
            t = float(value)
        except ValueError:
            p.error(f"--target: {value!r} is not a number")
        if not 0.0 <= t <= 1.0:
            p.error(f"--target: Recall@1 must be in [0, 1], got {t}")
        targets.append((t, label))
    try:
        targets = targets or default_targets(args.out, summary)
    except (ValueError, KeyError, TypeError) as exc:
        p.error(f"out: its results.json or floor.json has no floor Recall@1 ({type(exc).__name__}: {exc})")
    text = table(runs, targets, batches_per_epoch)
    with open(os.path.join(args.out, "steps_to_target.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
