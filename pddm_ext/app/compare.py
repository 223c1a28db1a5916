"""``pddm-ext compare``: the four losses on one dataset, several seeds, an equal budget (same
batches, same batch size, same network, same optimiser), summarised as a markdown table
(mean +- std of Recall@K, MAP@R, R-Precision and NMI on the test classes), a convergence plot (Recall@1 against
epoch and against training time, one line per loss) and a JSON file with every epoch of every run.

Besides the losses, ``VARIANTS`` name PDDM variants: ``pddm-paper`` is the loss as the
paper describes it (input-normalised unit, no pair term, hardest negatives: ``PDDMLoss`` before its options against the collapse);
``pddm-hardest``, ``pddm-semihard`` and ``pddm-warmup`` set one option of the default ``pddm``;
``pddm-euclidean`` is the control: the same loss with every batch's quadruplets mined by Euclidean
distance instead of by the unit (``pddm-hardest-euclidean``: the control of ``pddm-hardest``). Every entry of ``--losses`` is a loss or a
variant. The table adds a paired test of each entry against the first one on final Recall@1 over the
same seeds (``scipy.stats.ttest_rel``; the runs of one seed share the batches and the initial network).

Runs live in ``<out>/runs/<loss>-seed<seed>``; a finished run is not repeated and an interrupted
one resumes from its checkpoint, so the command can be rerun after a crash.

The table's and the plot's floor is raw pixels (``floor_label``). When ``<out>/floor.json`` exists
(``python -m benchmarks.frozen_features --floor-only``: the pretrained network's own features, the
fine-tuning regime's floor), the plot draws its Recall@1 too, as "pretrained features".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from . import loss_options
from .config import ConfigError, legacy_defaults, prepare, resolved_defaults
from .losses import LOSSES
from .report import METRIC_TITLES, write_text_atomic
from .train import CHECKPOINT, train

PDDM_LOSSES = ("pddm", "pddm-triplet")


def __getattr__(name):
    """``VARIANTS`` (name -> (loss, TrainConfig fields it sets), declared with PDDMLoss's options:
    ``LossOption.variants``), ``ENTRIES`` (the losses, then the variants) and ``PDDM_ONLY_FIELDS``
    (TrainConfig fields only the PDDM losses read, in build_loss and build_optimizer: a baseline's
    finished run is reused, and its interrupted run resumed, whatever they are), read from the
    options' declarations on each access."""
    if name == "VARIANTS":
        return loss_options.variants()
    if name == "ENTRIES":
        return tuple(LOSSES) + tuple(loss_options.variants())
    if name == "PDDM_ONLY_FIELDS":
        return loss_options.pddm_only_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unread_fields(cfg):
    """The PDDM-only fields when cfg's loss does not read them (a baseline), else none."""
    return set() if cfg.loss in PDDM_LOSSES else set(loss_options.pddm_only_fields())


def entry_config(base, name):
    """``base`` with the loss and overrides of entry ``name`` (a loss or a VARIANTS key); a plain loss
    name is its own entry with no overrides."""
    loss, overrides = loss_options.variants().get(name, (name, {}))
    return dataclasses.replace(base, loss=loss, **overrides)

METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi")


def run_all(base, losses=LOSSES, seeds=(0, 1, 2, 3, 4), out="results/compare", *, progress=True,
            floor_label="raw pixels"):
    """Trains every (loss, seed) with ``base`` (a TrainConfig) and writes the summary files; returns the summary.
    ``floor_label`` names the floor row of the table and its line in the plot.

    ``losses`` and ``seeds`` must not repeat a value (a repeat would be the same run counted twice):
    ConfigError otherwise, before any work."""
    for name, values in (("losses", losses), ("seeds", seeds)):
        repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
        if repeated:
            raise ConfigError(f"{name}: {', '.join(map(str, repeated))} given more than once; each value is one run")
        if not len(values):
            raise ConfigError(f"{name} must name at least one value")
    split = prepare(entry_config(base, losses[0]))  # every error before any training
    runs = []
    for loss in losses:
        for seed in seeds:
            cfg = dataclasses.replace(entry_config(base, loss), seed=seed, out=os.path.join(out, "runs", f"{loss}-seed{seed}"))
            done = _finished(cfg)
            if done is None:
                resume = os.path.exists(os.path.join(cfg.out, CHECKPOINT))
                t0 = time.perf_counter()
                # an interrupted run resumes only with the same options (else a one-line ConfigError
                # naming them: the folder holds runs of another configuration), to this budget
                explicit = {f.name for f in dataclasses.fields(cfg)} - _unread_fields(cfg)
                done = train(cfg, resume=resume, progress=progress, split=split, explicit=explicit)
                # a summary line per run, like train's per-epoch lines
                print(f"[compare] {loss} seed {seed}: R@1 {done['history'][-1]['recall@1']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            runs.append(dict(done, entry=loss))
    summary = summarise(runs, losses)
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    write_text_atomic(os.path.join(out, "results.md"), markdown(summary, floor_label))
    references = [(summary["floor"]["recall@1"], floor_label)]
    floor_json = os.path.join(out, "floor.json")
    if os.path.exists(floor_json):
        with open(floor_json) as f:
            references.insert(0, (json.load(f)["floor"]["recall@1"], "pretrained features"))
    plot_convergence(summary, os.path.join(out, "convergence.png"), references)
    return summary


def _finished(cfg):
    cfg = resolved_defaults(cfg)  # as the run recorded it
    path = os.path.join(cfg.out, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    # a key missing from an older result.json (an option added since) counts as its default
    saved = {**dataclasses.asdict(type(cfg)()), **legacy_defaults(), **result["config"]}
    ignored = set(type(cfg).RUNTIME_FIELDS) | _unread_fields(cfg)
    same = {k: v for k, v in saved.items() if k not in ignored} == {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    return result if same and len(result["history"]) == cfg.epochs else None


def summarise(runs, losses):
    """Per loss: final metrics (mean, std over seeds), mean Recall@1 and training time per epoch."""
    first = runs[0]
    per_loss = {}
    for loss in losses:
        rs = [r for r in runs if r.get("entry", r["config"]["loss"]) == loss]
        # a metric missing from a run saved before it existed counts as NaN (shown as "-")
        final = {m: [r["history"][-1].get(m, float("nan")) for r in rs] for m in METRICS}
        curve = np.array([[h["recall@1"] for h in r["history"]] for r in rs])
        times = np.array([[h["train_time"] for h in r["history"]] for r in rs])
        per_loss[loss] = dict(
            seeds=[r["config"]["seed"] for r in rs],
            final={m: dict(mean=float(np.mean(v)), std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, values=v)
                   for m, v in final.items()},
            recall1_mean=curve.mean(0).tolist(), recall1_std=curve.std(0, ddof=1).tolist() if len(rs) > 1 else [0.0] * curve.shape[1],
            train_time_mean=times.mean(0).tolist(),
            runs=[dict(seed=r["config"]["seed"], history=r["history"],
                       budget_changes=r.get("budget_changes", [])) for r in rs],
        )
    dataset = dict(first["dataset"])
    return dict(dataset=dataset, config={k: v for k, v in first["config"].items() if k not in ("loss", "seed", "out")},
                batch=first["batch"], model=first["model"], floor=first["floor"], losses=per_loss,
                paired=paired_tests(per_loss))


def paired_tests(per_loss, metric="recall@1"):
    """Each entry against the first on final ``metric``, paired by seed (``scipy.stats.ttest_rel``):
    {entry: {"mean_difference", "t", "p", "seeds"}}; p is None with fewer than 2 common seeds or
    identical differences."""
    from scipy.stats import ttest_rel

    names = list(per_loss)
    first = per_loss[names[0]]
    ref = dict(zip(first["seeds"], first["final"][metric]["values"]))
    out = {}
    for name in names[1:]:
        other = dict(zip(per_loss[name]["seeds"], per_loss[name]["final"][metric]["values"]))
        seeds = sorted(set(ref) & set(other))
        a, b = np.array([other[s] for s in seeds]), np.array([ref[s] for s in seeds])
        diff = a - b
        t = p = None
        if len(seeds) >= 2 and np.ptp(diff) > 0:
            res = ttest_rel(a, b)
            t, p = float(res.statistic), float(res.pvalue)
        out[name] = dict(against=names[0], mean_difference=float(diff.mean()) if len(seeds) else None,
                         t=t, p=p, seeds=seeds)
    return out


def _unit_lr(cfg):
    return f" (PDDM unit {cfg['unit_lr']})" if cfg.get("unit_lr") is not None else ""


def _batch_norm(cfg):
    """What the batch-norm statistics did, where it is not the default of a network trained from scratch."""
    if cfg.get("freeze_bn"):
        return "; batch norm frozen"
    return "; batch-norm statistics following the batches" if cfg.get("pretrained") else ""


def markdown(summary, floor_label="raw pixels"):
    cfg, ds, batch = summary["config"], summary["dataset"], summary["batch"]
    lines = [f"# {ds['name']}: PDDM mining vs Euclidean mining", ""]
    n_seeds = len(next(iter(summary["losses"].values()))["seeds"])
    lines.append(f"Zero-shot: train on classes {', '.join(ds['train_classes'])}; retrieve among "
                 f"{', '.join(ds['test_classes'])} (every test image queries all others).")
    lines.append(f"Budget per run: {cfg['epochs']} epochs x {batch['batches_per_epoch']} batches of "
                 f"P={batch['p']} x K={batch['k']}; {summary['model']}, embedding dim {cfg['embedding_dim']}, "
                 f"Adam lr {cfg['lr']}{_unit_lr(cfg)}; alpha {cfg['alpha']}, beta {cfg['beta']}, lam {cfg['lam']}, "
                 f"mine k {cfg['mine_k'] or 'P K / 2'}{_batch_norm(cfg)}; "
                 f"{n_seeds} seeds; mean +- std over seeds after the last epoch.")
    changed = [f"{name} seed {run['seed']} ({change['epochs_before']} -> {change['epochs']} epochs after epoch "
               f"{change['after_epoch']})" for name, entry in summary["losses"].items()
               for run in entry["runs"] for change in run.get("budget_changes", [])]
    if changed:  # a resumed run given a new --epochs: with one-cycle, not a straight run of this budget
        schedule = cfg.get("schedule", legacy_defaults()["schedule"])
        effect = {"onecycle": "; with the one-cycle schedule these are not straight runs of this budget (the cycle "
                              "is re-planned at the change)",
                  "constant": "; with the constant lr each equals a straight run of this budget"}.get(schedule, "")
        lines.append(f"Epoch budget changed on resume{effect}: {', '.join(changed)}.")
    all_variants = loss_options.variants()
    variants = [name for name in summary["losses"] if name in all_variants]
    if variants:  # what the PDDM entries are (the first entry's options, and what each variant sets)
        first = next(iter(summary["losses"]))
        # the options added since the first runs (a result saved before one counts as its legacy value)
        first_options = ", ".join(f"{k} {cfg.get(k, v)}" for k, v in loss_options.legacy_defaults().items())
        lines.append(f"PDDM options of the first entry ({first}): {first_options}; the variants set "
                     + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in all_variants[name][1].items())
                                 for name in variants) + ".")
    if "font_hash" in ds:
        lines.append(f"Fonts: {len(ds['font_files'])} files, list hash `{ds['font_hash'][:16]}` (full list in results.json).")
    lines += ["", "| loss | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | train s |",
              "|---|" + "---|" * (len(METRICS) + 1)]
    for loss, r in summary["losses"].items():
        cells = [f"{r['final'][m]['mean']:.3f} ± {r['final'][m]['std']:.3f}" if np.isfinite(r['final'][m]['mean'])
                 else "-" for m in METRICS]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {r['train_time_mean'][-1]:.0f} |")
    floor = summary["floor"]
    lines.append(f"| {floor_label} | " + " | ".join(f"{floor[m]:.3f}" if m in floor else "-" for m in METRICS) + " | |")
    if summary.get("paired"):
        lines += ["", "Paired test on final Recall@1 against the first entry (same seeds; scipy.stats.ttest_rel):", "",
                  "| entry | mean difference | t | p |", "|---|---|---|---|"]
        for name, t in summary["paired"].items():
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(f"| {name} - {t['against']} | {fmt(t['mean_difference'], '+.3f')} | {fmt(t['t'], '.2f')} "
                         f"| {fmt(t['p'], '.3f')} |")
    lines += ["", "train s: mean cumulative training time (evaluation excluded) in seconds, wall clock on the "
              "machine that ran it; on a shared machine it measures the load as much as the loss."]
    lines += ["", "Recall@1 (mean over seeds) after each epoch:", "",
              "| loss | " + " | ".join(str(e + 1) for e in range(cfg["epochs"])) + " |",
              "|---|" + "---|" * cfg["epochs"]]
    for loss, r in summary["losses"].items():
        lines.append(f"| {loss} | " + " | ".join(f"{v:.3f}" for v in r["recall1_mean"]) + " |")
    return "\n".join(lines) + "\n"


def plot_convergence(summary, path, references=None):
    """Recall@1 against epoch and against training time, one line per loss (mean, and +- std per
    epoch); ``references``: [(Recall@1, label)] drawn as dashed lines (default: the floor, "raw pixels")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for loss, r in summary["losses"].items():
        mean, std = np.array(r["recall1_mean"]), np.array(r["recall1_std"])
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax_e.plot(epochs, mean, marker="o", label=loss)
        ax_e.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax_t.plot(r["train_time_mean"], mean, marker="o", color=line.get_color(), label=loss)
    from matplotlib.ticker import MaxNLocator

    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    references = [(summary["floor"]["recall@1"], "raw pixels")] if references is None else references
    for ax in (ax_e, ax_t):
        for (value, label), style in zip(references, ("--", ":", "-.")):
            ax.axhline(value, color="grey", linestyle=style, label=label)
        ax.grid(alpha=0.3)
    ax_e.set_xlabel("epoch")
    ax_t.set_xlabel("training time (s, mean over seeds)")
    ax_e.set_ylabel("Recall@1 on the test classes")
    ax_e.legend()
    n = len(next(iter(summary["losses"].values()))["seeds"])
    fig.suptitle(f"{summary['dataset']['name']}: Recall@1 (mean ± std over {n} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
