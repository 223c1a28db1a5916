"""What a training run shows and writes besides its checkpoint: the per-epoch summary line, the final
table, the Recall@1 plot, TensorBoard's scalars of a log line, the progress bar (only on a terminal), and
the atomic text writes of ``log.jsonl`` / ``result.json``. ``train.Run`` calls these; ``compare`` reuses
the metric titles and the atomic write."""

from __future__ import annotations

import os
import sys

from . import diagnostics as diag_mod


def write_text_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_recall(history, floor, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["epoch"] for h in history], [h["recall@1"] for h in history], marker="o", label="embedding")
    ax.axhline(floor["recall@1"], color="grey", linestyle="--", label="raw pixels")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Recall@1 (test classes)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# The retrieval metrics of the summary table and the per-epoch line: log key -> column title.
METRIC_TITLES = {"recall@1": "R@1", "recall@2": "R@2", "recall@4": "R@4", "recall@8": "R@8",
                 "map@r": "MAP@R", "r_precision": "RP", "nmi": "NMI"}


def _cell(row, key, width=6):
    value = row.get(key)
    return f"{value:>{width}.3f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"  # a run from before the metric


def format_table(history, floor):
    """The final table: one row per epoch (loss, Recall@K, MAP@R, R-Precision, NMI, time) and the
    raw-pixel floor."""
    head = f"{'epoch':>5} {'loss':>8} " + " ".join(f"{t:>6}" for t in METRIC_TITLES.values()) + f" {'time s':>7}"
    lines = [head, "-" * len(head)]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['loss']:>8.4f} " + " ".join(_cell(h, c) for c in METRIC_TITLES)
                     + f" {h['train_time']:>7.1f}")
    lines.append(f"{'raw pixels':>14} " + " ".join(_cell(floor, c) for c in METRIC_TITLES))
    return "\n".join(lines)


def format_epoch(entry):
    """The per-epoch summary line (printed after every epoch, on a terminal or not), and for the PDDM
    losses a second line with the unit's diagnostics (``pddm_ext.app.diagnostics``)."""
    metrics = "  ".join(f"{METRIC_TITLES[c]} {entry[c]:.3f}" for c in ("recall@1", "recall@8", "map@r", "r_precision", "nmi")
                        if c in entry)
    line = f"epoch {entry['epoch']}: loss {entry['loss']:.4f}  {metrics}  ({entry['epoch_time']:.1f} s)"
    if entry.get("unit"):
        line += "\n  " + diag_mod.format_diagnostics(entry["unit"])
    return line

def scalars(entry, prefix=""):
    """(tag, value) for every number in a log entry, nested dicts as ``group/key`` (e.g. ``loss``,
    ``recall@1``, ``mining/tuples``); the epoch and booleans are left out."""
    for key, value in entry.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            yield tag, float(value)


def progress_bar(iterable, total, desc, enabled, stream=None):
    """A tqdm bar over ``iterable`` when ``enabled`` and ``stream`` (default stderr) is a terminal; else
    ``iterable`` itself: off a terminal (CI logs, nohup, ``> log``) the per-epoch summary lines are the
    whole progress report, instead of a carriage-return update per batch."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not _is_terminal(stream):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)


def _is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
