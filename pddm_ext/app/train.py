"""The training loop: an embedding trained with PDDM hard mining (or a baseline) on the training
half of the classes, evaluated by retrieval on the other half after every epoch.

``train(TrainConfig(...))`` is what ``pddm-ext train`` runs: a :class:`Run` (setup, then per epoch
``train_epoch`` / ``evaluate`` / ``save``, then ``finish``). Each epoch shows a progress bar (only
when stderr is a terminal) with the loss and the mining statistics, prints a summary line (always), appends a line to ``<out>/log.jsonl``, writes
``<out>/checkpoint.pt`` atomically (model, PDDM unit, optimiser, epoch, every RNG state, config);
at the end it draws Recall@1 per epoch in ``<out>/recall_at_1.png``.
``resume=True`` continues from the checkpoint and gives the same numbers as an uninterrupted run.

The losses (``loss=``: pddm, pddm-triplet, batch-hard, triplet-random) are built in
``pddm_ext.app.losses`` from the library's ``PDDMLoss`` and ``batch_hard`` and pytorch-metric-learning's
``TripletMarginLoss``.

The PDDM unit's parameters are in the same optimiser as the network's (Adam at ``lr``, or at
``unit_lr`` in a second param group when that is set).

Multi-process (``torchrun --nproc_per_node N pddm-ext train ...``, DDP on gloo or nccl): every rank
draws the same P x K batch and takes its share (``pddm_ext.distributed.ShardedBatchSampler``); the
loss sees the global batch (``GlobalBatchLoss``: all ranks' embeddings, each rank back-propagating
through its own) and DDP averages the gradients, so a step equals one single-process step on the
whole batch (up to BatchNorm statistics on CPU: see ``_distribute``). Rank 0 alone prints and
writes the log, plot, result and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from .. import collectives
from ..integrations import distributed as dist_
from ..sampler import PKSampler
from . import extra_hint
from . import datasets as data_mod
from . import diagnostics as diag_mod
from . import loss_options, options
from .loss_options import train_default
from . import evaluate as ev
from .augment import random_affine
from .checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from .losses import LOSSES, batch_stats, build_loss
from .models import BACKBONES, ModelError, build_model, efficientnet_lite0_weights, resolve_backbone, torchvision_available
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PLOT = "recall_at_1.png"


class ConfigError(ValueError):
    """A configuration that cannot train (one-line message, raised before any training)."""


class DivergenceError(RuntimeError):
    """Training diverged: the network's embeddings or the loss became NaN or Inf (one-line message;
    the checkpoint of the last finished epoch stays as it was)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and result."""

    dataset: str = "glyphs"  # mnist5k's five training classes did not beat its raw pixels
    loss: str = "pddm"
    epochs: int = 8
    p: int | None = None  # classes per batch; default min(8, number of training classes)
    k: int = 8  # images per class in a batch
    batches_per_epoch: int | None = 50  # None: training images // (P K)
    lr: float = 1e-3
    unit_lr: float | None = None  # Adam lr of the PDDM unit (PDDM losses); default: lr (one param group)
    embedding_dim: int = 64
    # PDDMLoss's options (the PDDM losses; each declared in pddm_ext.modules.LOSS_OPTIONS; where a default
    # differs from PDDMLoss's, and why: loss_options.TRAIN_DEFAULTS). mine_k is PDDMLoss's k (None: P K / 2).
    mine_k: int | None = train_default("mine_k")
    alpha: float = train_default("alpha")
    beta: float = train_default("beta")
    lam: float = train_default("lam")
    bce_weight: float = train_default("bce_weight")
    normalize_inputs: bool = train_default("normalize_inputs")
    negatives: str = train_default("negatives")
    warmup_steps: int = train_default("warmup_steps")  # ends early, see Run.evaluate
    mining: str = train_default("mining")
    augment: bool = True  # random affine augmentation of training batches (pddm_ext.app.augment)
    schedule: str = "onecycle"  # learning rate: onecycle (OneCycleLR to lr) or constant
    holdout: float = 0.1  # fraction of training-class images held out for the unit's diagnostics
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    out: str | None = None  # default: runs/<dataset>-<loss>-seed<seed>
    backbone: str = "auto"  # auto | small | resnet18 | efficientnet-lite0
    font_dirs: list | None = None  # glyphs: where to look for fonts (default: the system dirs)
    image_size: int | None = None  # folder: default 224 (resnet18, efficientnet-lite0) or 64 (small CNN)
    # CPU threads for torch. Default 1: the small CNN gains little from more, and on a shared
    # machine extra OpenMP threads spin-wait for busy cores (measured 10-20x slower epochs).
    threads: int | None = None
    pretrained: bool = False  # ImageNet weights: resnet18 torchvision's download (or its cache), efficientnet-lite0 a package's
    tensorboard: str | None = None  # a folder for TensorBoard event files of the per-epoch metrics (output only)

    # fields that say where and how a run executes, not what it computes: a resume may change them
    RUNTIME_FIELDS = ("out", "device", "threads", "tensorboard")

    def resolved_out(self):
        if self.out:
            return self.out
        name = self.dataset.replace("/", "_").replace(":", "-").strip("_")
        return os.path.join("runs", f"{name}-{self.loss}-seed{self.seed}")


# The values that fields added since the first runs had before they existed: a checkpoint or result.json
# without them resumes or compares as the run it was. PDDMLoss's options declare theirs (LOSS_OPTIONS).
_APP_LEGACY_DEFAULTS = dict(augment=False, schedule="constant", holdout=0.0)


def legacy_defaults():
    """``LEGACY_DEFAULTS``: field -> its value in runs saved before it existed."""
    return {**loss_options.legacy_defaults(), **_APP_LEGACY_DEFAULTS}


def __getattr__(name):  # LEGACY_DEFAULTS is read from the options' declarations on each access
    if name == "LEGACY_DEFAULTS":
        return legacy_defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def saved_config(config):
    """TrainConfig of a saved config dict (checkpoint, result.json); missing fields take LEGACY_DEFAULTS."""
    return TrainConfig(**{**legacy_defaults(), **config})


# --- configuration checks ---------------------------------------------------------------------


def check_config(cfg):
    """Every check that needs no data: raises ConfigError with a one-line message. The value rules
    are those of the command line's options (``pddm_ext.app.options``), with the same messages."""
    message = options.dataset_problem(cfg.dataset)
    if message:
        raise ConfigError(message)
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
    for name, rule in options.NUMBERS.items():
        value = getattr(cfg, name)
        message = None if value is None and name in options.OPTIONAL else rule.problem(value)
        if message:
            raise ConfigError(message)
    message = loss_options.choice_problem(cfg)
    if message:
        raise ConfigError(message)
    if cfg.schedule not in ("onecycle", "constant"):
        raise ConfigError(f"schedule must be onecycle or constant, got {cfg.schedule!r}")
    message = options.device_problem(cfg.device)
    if message:
        raise ConfigError(message)
    out = cfg.resolved_out()
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out {out!r} exists and is not a folder: choose another --out")
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; expected auto, small, resnet18 or efficientnet-lite0")
    if cfg.tensorboard is not None and os.path.exists(cfg.tensorboard) and not os.path.isdir(cfg.tensorboard):
        raise ConfigError(f"tensorboard {cfg.tensorboard!r} exists and is not a folder: choose another --tensorboard")
    if cfg.tensorboard is not None:
        tensorboard_writer_class()  # ConfigError when tensorboard is not installed
    if cfg.pretrained and cfg.backbone == "small":
        raise ConfigError("--pretrained needs --backbone resnet18 (or auto with a folder: dataset) or efficientnet-lite0; "
                          "the small CNN has no pretrained weights")
    if cfg.pretrained and cfg.backbone == "efficientnet-lite0":
        try:
            efficientnet_lite0_weights()
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.backbone == "resnet18" and not torchvision_available():
        raise ConfigError("backbone resnet18 needs torchvision built for this torch, which is not importable here: "
                          "pip install the torchvision release that matches your torch (see pytorch.org), "
                          "or use --backbone small")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {cfg.device} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")


TENSORBOARD_HINT = f"pip install tensorboard ({extra_hint('tensorboard')})"


def tensorboard_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or ConfigError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
        raise ConfigError(f"--tensorboard needs the tensorboard package, which is not importable here ({exc}); "
                          f"{TENSORBOARD_HINT}") from None
    return SummaryWriter


def scalars(entry, prefix=""):
    """(tag, value) for every number in a log entry, nested dicts as ``group/key`` (e.g. ``loss``,
    ``recall@1``, ``mining/tuples``); the epoch and booleans are left out."""
    for key, value in entry.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            yield tag, float(value)


def resolve_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}") from exc


def check_against_data(cfg, split):
    """The checks that need the dataset: P against the number of training classes, and a test half on
    which every retrieval metric is defined (``evaluate.evaluation_problem``)."""
    problem = ev.evaluation_problem(split.test_labels, class_names=split.info.get("test_classes"))
    if problem:
        raise ConfigError(f"dataset {cfg.dataset} cannot be evaluated: {problem}")
    n = split.num_train_classes
    if n < 2:
        raise ConfigError(f"dataset {cfg.dataset} has {n} training class(es); needs at least 2")
    if cfg.p is not None and cfg.p > n:
        raise ConfigError(f"P = {cfg.p} classes per batch but dataset {cfg.dataset} has only {n} training classes")
    if cfg.pretrained and resolve_backbone(split.image_shape, cfg.backbone) == "small":
        c, h, w = split.image_shape
        raise ConfigError(f"--pretrained needs the resnet18 backbone, but --backbone {cfg.backbone} gives dataset "
                          f"{cfg.dataset} ({c} x {h} x {w} images) the small CNN, which has no pretrained weights "
                          f"(auto takes resnet18 for 3-channel images of 64 px or more when torchvision is installed; "
                          f"--backbone efficientnet-lite0 takes any images)")


def build_optimizer(cfg, model, loss_fn):
    """Adam over the network and the loss's parameters (the PDDM unit). With ``cfg.unit_lr`` set, the
    unit is a second param group with that learning rate; unset, one group at ``cfg.lr``."""
    if cfg.unit_lr is None or not list(loss_fn.parameters()):
        return torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr)
    return torch.optim.Adam([dict(params=list(model.parameters())),
                             dict(params=list(loss_fn.parameters()), lr=cfg.unit_lr)], lr=cfg.lr)


# --- RNG, checkpoints, logs, plots ----------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def holdout_split(split, fraction, seed):
    """``split`` with ``fraction`` of each training class's images moved to ``split.heldout`` (a
    seeded choice, at least 2 per class when a class has >= 4 images, so held-out positive pairs
    exist, and at most all but 2, so the class keeps a training pair; none when fraction is 0).
    Returns (split, heldout dataset or None: None also when no class has 4 images)."""
    if fraction == 0:
        return split, None
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(split.train_labels):
        items = torch.nonzero(split.train_labels == c).flatten()
        # at least 2 (a held-out positive pair), at most all but 2 (the class keeps a training pair)
        n = min(max(2, round(fraction * len(items))), len(items) - 2) if len(items) >= 4 else 0
        held.append(items[torch.randperm(len(items), generator=g)[:n]])
    held = torch.cat(held).sort().values
    if len(held) == 0:  # every training class has fewer than 4 images: nothing to hold out
        return split, None
    keep = torch.ones(len(split.train_labels), dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().flatten()

    def subset(ds, idx):
        if isinstance(ds, data_mod.TensorImages):
            return data_mod.TensorImages(ds.images[idx], ds.labels[idx])
        return torch.utils.data.Subset(ds, idx.tolist())

    new = dataclasses.replace(split, train=subset(split.train, kept), train_labels=split.train_labels[kept])
    return new, subset(split.train, held)


def prepare(cfg):
    """Checks the configuration and loads the data; every error here comes before any training."""
    check_config(cfg)
    image_size = cfg.image_size
    if cfg.dataset.startswith("folder:") and image_size is None:
        large = cfg.backbone == "efficientnet-lite0" or (cfg.backbone != "small" and torchvision_available())
        image_size = 224 if large else 64
    split = data_mod.load_dataset(cfg.dataset, font_dirs=cfg.font_dirs, image_size=image_size)
    check_against_data(cfg, split)
    return split


# --- the run ----------------------------------------------------------------------------------


class Run:
    """One training run. ``train()`` is the whole loop::

        run = Run(cfg, resume=..., progress=..., split=...)   # setup: data, model, loss, optimiser, resume
        for epoch in run.epochs():
            entry = run.train_epoch(epoch)                     # one pass of P x K batches
            entry.update(run.evaluate())                       # retrieval metrics on the test classes
            run.save(entry)                                    # log line, checkpoint, summary line
        return run.finish()                                    # plot and result.json

    Under torchrun the distributed parts live in ``setup`` alone (``_distribute``): the process group,
    DDP around the model and the loss, this rank's share of each batch; afterwards only ``is_main``
    (rank 0 writes) tells the ranks apart.
    """

    def __init__(self, cfg, *, resume=False, progress=True, split=None, explicit=None):
        self.out = cfg.resolved_out()
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        if not resume and os.path.exists(self.ckpt_path):
            raise ConfigError(f"{self.out} already holds a run ({CHECKPOINT}): use --resume to continue it, "
                              "or another --out (or delete the folder) to start a new one")
        checkpoint = self._load_checkpoint(cfg) if resume else None
        if checkpoint is not None:
            # a resumed run keeps its configuration; only the epoch budget, device and threads may change
            saved = saved_config(checkpoint["config"])
            changed = [f"{name} {getattr(cfg, name)!r} (the run has {getattr(saved, name)!r})"
                       for name in sorted(explicit or ())
                       if name not in ("epochs", *TrainConfig.RUNTIME_FIELDS)
                       and getattr(cfg, name) != getattr(saved, name)]
            if changed:
                raise ConfigError(f"--resume continues the run in {self.out} with its own configuration; it cannot "
                                  f"change {', '.join(changed)}: start a new run (another --out) instead")
            epochs = cfg.epochs if explicit is None or "epochs" in explicit else saved.epochs
            if epochs < checkpoint["epoch"]:
                raise ConfigError(f"--resume: the run in {self.out} has trained {checkpoint['epoch']} epochs, more "
                                  f"than --epochs {epochs}")
            cfg = dataclasses.replace(saved, epochs=epochs, device=cfg.device,
                                      threads=cfg.threads, tensorboard=cfg.tensorboard, out=self.out)
        self.cfg, self.resume = cfg, resume
        self.setup(split, checkpoint, progress)

    def _load_checkpoint(self, cfg):
        if not os.path.exists(self.ckpt_path):
            raise ConfigError(f"--resume: no checkpoint at {self.ckpt_path}")
        return load_checkpoint(self.ckpt_path)  # weights_only=True; CheckpointError naming the file

    def setup(self, split, checkpoint, progress):
        cfg = self.cfg
        if split is None:
            split = prepare(cfg)
        else:
            check_config(cfg)
            check_against_data(cfg, split)
        self.split, self.heldout = holdout_split(split, cfg.holdout, cfg.seed)
        split = self.split
        device, world = _distribute.init(resolve_device(cfg.device))
        self.device, self.world, self.is_main = device, world, dist_.rank() == 0
        self.progress = progress and self.is_main  # progress bars (on a terminal only)
        self.p = cfg.p or min(8, split.num_train_classes)
        if device.type == "cpu" or cfg.threads:
            torch.set_num_threads(cfg.threads or 1)

        seed_everything(cfg.seed)
        self.model, self.model_desc = build_model(split.image_shape, cfg.embedding_dim, backbone=cfg.backbone,
                                                  pretrained=cfg.pretrained,
                                                  input_norm=split.info.get("input_norm"))
        self.loss_fn = build_loss(cfg, self.p)
        self.model.to(device)
        self.loss_fn.to(device)
        self.optimizer = build_optimizer(cfg, self.model, self.loss_fn)
        self.sampler = PKSampler(split.train_labels, self.p, cfg.k, num_batches=cfg.batches_per_epoch,
                                          seed=cfg.seed)
        self.scheduler = None
        if cfg.schedule == "onecycle":  # one cycle over the whole run (Smith & Topin 2019), peak at lr
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=[g["lr"] for g in self.optimizer.param_groups],
                total_steps=cfg.epochs * len(self.sampler))
        self.train_model, self.train_loss, self.batch_sampler = _distribute.wrap(
            self.model, self.loss_fn, self.sampler, device, world)
        self.history, self.start_epoch, self.train_time, floor = [], 0, 0.0, None
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.loss_fn.load_state_dict(checkpoint["loss"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.scheduler is not None:
                total = self.scheduler.total_steps
                self.scheduler.load_state_dict(checkpoint["scheduler"])
                # a resume may change the epoch budget: the rest of the cycle stretches to the new total
                # (exact continuation holds only for an unchanged budget)
                self.scheduler.total_steps = max(total, self.scheduler.last_epoch + 1)
            set_rng_state(checkpoint["rng"], self.sampler.generator)
            self.history, self.start_epoch = checkpoint["history"], checkpoint["epoch"]
            self.train_time, floor = checkpoint["train_time"], checkpoint["floor"]
        if floor is None:
            # a property of the dataset (k-means seeded with 0), so computed once per split
            floor = split.__dict__.get("_pixel_floor") or ev.pixel_floor(split.test, seed=0)
            split.__dict__["_pixel_floor"] = floor
        self.floor = floor
        self.info = dict(split.info)
        self.tensorboard = None
        if self.is_main:
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as e:  # e.g. under /proc, or below a file
                raise ConfigError(f"--out {self.out}: cannot create the folder ({e.strerror})") from None
            if cfg.tensorboard is not None:  # one scalar per number of the log line, step = epoch
                self.tensorboard = tensorboard_writer_class()(log_dir=cfg.tensorboard, purge_step=self.start_epoch + 1)
            write_text_atomic(os.path.join(self.out, LOG), "".join(json.dumps(h) + "\n" for h in self.history))
        self.say(f"{cfg.dataset}: {len(split.train)} training images ({split.num_train_classes} classes), "
                 f"{len(split.test)} test images; model {self.model_desc}, loss {cfg.loss}, P={self.p} K={cfg.k}, "
                 f"{len(self.sampler)} batches/epoch, device {device}; writing {self.out}")
        if self.resume:
            self.say(f"resuming after epoch {self.start_epoch} of {cfg.epochs}")

    def say(self, msg):
        """A status line on stderr (rank 0; with or without progress bars, on a terminal or not)."""
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def epochs(self):
        return range(self.start_epoch, self.cfg.epochs)

    def batches(self):
        """(images, labels) of this rank's share of each batch of the epoch."""
        train = self.split.train
        if isinstance(train, data_mod.TensorImages):  # in memory: index directly, no DataLoader
            return ((train.images[b], train.labels[b]) for b in self.batch_sampler)
        return iter(torch.utils.data.DataLoader(train, batch_sampler=self.batch_sampler))

    def train_epoch(self, epoch):
        """One epoch of training; returns {epoch, loss, mining, epoch_time, train_time}."""
        self.model.train()
        losses, stats_sum, stats_n = [], {}, {}
        t0 = time.perf_counter()
        batches = self.batches()
        bar = _progress_bar(batches, len(self.sampler), f"epoch {epoch + 1}/{self.cfg.epochs}", self.progress)
        for batch, (x, y) in enumerate(bar, 1):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device)
            if self.cfg.augment:
                x = random_affine(x)
            embeddings = self.train_model(x)
            # one sync per batch, as loss.item() below: a diverged network is named here, not as the
            # loss's "embeddings contains NaN or Inf" traceback; under DDP every rank agrees first, so
            # all raise together and none waits in the loss's collectives
            if not collectives.all_ranks(torch.isfinite(embeddings).all()):
                raise DivergenceError(f"training diverged at epoch {epoch + 1}, batch {batch}: the network's embeddings "
                                      f"contain NaN or Inf{' on a rank' if collectives.world_size() > 1 else ''} "
                                      f"(lr {self.cfg.lr:g}: try a lower --lr)")
            loss = self.train_loss(embeddings, y)
            if not collectives.all_ranks(torch.isfinite(loss)):
                raise DivergenceError(f"training diverged at epoch {epoch + 1}, batch {batch}: the loss is "
                                      f"{loss.item()} (lr {self.cfg.lr:g}: try a lower --lr)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            losses.append(loss.item())
            for key, value in batch_stats(self.loss_fn).items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value
                stats_n[key] = stats_n.get(key, 0) + 1
            if bar is not batches:
                bar.set_postfix(loss=f"{np.mean(losses):.4f}",
                                tuples=stats_sum.get("tuples", 0) / max(1, stats_n.get("tuples", 1)), refresh=False)
        epoch_time = time.perf_counter() - t0
        self.train_time += epoch_time
        return dict(epoch=epoch + 1, loss=float(np.mean(losses)),
                    mining={k: stats_sum[k] / stats_n[k] for k in stats_sum},
                    epoch_time=epoch_time, train_time=self.train_time)

    def evaluate(self):
        """Retrieval metrics of the current model on the test classes (``evaluate.retrieval_metrics``);
        for the PDDM losses also ``unit``: the unit's diagnostics on held-out training-class pairs and
        on unseen-class pairs, and the epoch's mean metric loss (``pddm_ext.app.diagnostics``).

        The diagnostics also drive the warm-up (``warmup_steps``): it ends once the unit's AUC on
        held-out pairs reaches that of Euclidean distance."""
        emb, labels = ev.embed(self.model, self.split.test, device=self.device)
        out = ev.retrieval_metrics(emb, labels, seed=self.cfg.seed)
        unit = getattr(self.loss_fn, "unit", None)
        if unit is not None:
            diag = dict(unseen=diag_mod.pair_diagnostics(emb, labels, unit, seed=self.cfg.seed), heldout=None)
            if self.heldout is not None:
                h_emb, h_labels = ev.embed(self.model, self.heldout, device=self.device)
                diag["heldout"] = diag_mod.pair_diagnostics(h_emb, h_labels, unit, seed=self.cfg.seed)
                h = diag["heldout"]
                warming = getattr(self.loss_fn, "warmup_done", 0) < getattr(self.loss_fn, "warmup_steps", 0)
                if warming and self.cfg.mining == "pddm" and h["auc_S"] is not None and h["auc_S"] >= h["auc_euclidean"]:
                    self.loss_fn.end_warmup()
            out["unit"] = diag
        return out

    def save(self, entry):
        """Appends ``entry`` to the history; rank 0 writes the checkpoint, the log line and the summary line."""
        metrics = {k: entry.pop(k) for k in ("epoch_time", "train_time")}
        entry.update(metrics)  # key order of the log: epoch, loss, mining, metrics..., times
        self.history.append(entry)
        if not self.is_main:
            return
        if entry.get("unit"):
            entry["unit"]["metric_loss"] = entry.get("mining", {}).get("metric_loss")
            check = entry["unit"]["heldout"] or entry["unit"]["unseen"]
            entry["unit"]["collapsed"] = diag_mod.collapsed(check)
        save_atomic(dict(model=self.model.state_dict(), loss=self.loss_fn.state_dict(),
                         scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
                         optimizer=self.optimizer.state_dict(), epoch=entry["epoch"], rng=rng_state(self.sampler.generator),
                         config=dataclasses.asdict(self.cfg), history=self.history, train_time=self.train_time,
                         floor=self.floor, dataset=self.info), self.ckpt_path)
        with open(os.path.join(self.out, LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tensorboard is not None:
            for tag, value in scalars(entry):
                self.tensorboard.add_scalar(tag, value, global_step=entry["epoch"])
            self.tensorboard.flush()
        self.say(format_epoch(entry))
        if entry.get("unit", {}).get("collapsed"):
            self.say(f"warning: the PDDM unit has collapsed: the spread of its scores is below "
                     f"{diag_mod.COLLAPSE_SPREAD} (near-constant S; its hinge sits at 2 alpha and its ranking, "
                     f"the AUC above, is all that mining uses). See docs/experiments.md, 'Does the PDDM unit learn?'")

    def finish(self):
        """Rank 0 draws the plot and writes result.json; the process group started here is closed.
        Returns the result dict (config, dataset, model, raw-pixel floor, history, out, batch)."""
        cfg = self.cfg
        result = dict(config=dataclasses.asdict(cfg), dataset=self.info, model=self.model_desc, floor=self.floor,
                      history=self.history, out=self.out,
                      batch=dict(p=self.p, k=cfg.k, batches_per_epoch=len(self.sampler)))
        if self.is_main:
            if self.history:
                plot_recall(self.history, self.floor, os.path.join(self.out, PLOT),
                            f"{cfg.dataset}, loss {cfg.loss}, seed {cfg.seed}")
            write_text_atomic(os.path.join(self.out, "result.json"), json.dumps(result, indent=1))
        if self.tensorboard is not None:
            self.tensorboard.close()
        _distribute.close(self.world)
        return result


def train(cfg, *, resume=False, progress=True, split=None, explicit=None):
    """Runs (or with ``resume=True`` continues) a training run; returns the result dict
    (config, dataset info, raw-pixel floor, per-epoch history, output folder).

    ``explicit``: None (the API: ``cfg.epochs`` is the budget of a resumed run), or the TrainConfig
    fields the caller set on purpose (the command line's options). A resumed run keeps its saved
    configuration except the epoch budget (given in ``explicit``, else the saved one) and the runtime
    fields, so an explicit field that differs from the saved one raises ConfigError instead of being
    ignored. A budget below the epochs already trained raises ConfigError too."""
    run = Run(cfg, resume=resume, progress=progress, split=split, explicit=explicit)
    for epoch in run.epochs():
        entry = run.train_epoch(epoch)
        entry.update(run.evaluate())
        run.save(entry)
    return run.finish()


class _distribute:
    """Everything DDP in one place (``torchrun --nproc_per_node N pddm-ext train ...``)."""

    @staticmethod
    def init(device):
        """Joins torchrun's process group (a no-op in one process); returns (device, world size)."""
        device = dist_.init_from_env(device)
        return device, dist_.world_size()

    @staticmethod
    def wrap(model, loss_fn, sampler, device, world):
        """Under torchrun (world > 1): DDP around the model and around the loss over the global batch
        (when it has parameters: the PDDM unit), and this rank's share of every batch. Else unchanged.

        Exact equivalence with one process on the whole batch holds for everything but BatchNorm: on
        CUDA it becomes SyncBatchNorm; on CPU (gloo) each rank normalises with its own share's statistics."""
        if world == 1:
            return model, loss_fn, sampler
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device.type == "cuda" else None
        if device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm is CUDA-only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        global_loss = dist_.GlobalBatchLoss(loss_fn)
        if any(p.requires_grad for p in loss_fn.parameters()):
            global_loss = DDP(global_loss, device_ids=device_ids)
        return DDP(model, device_ids=device_ids), global_loss, dist_.ShardedBatchSampler(sampler)

    @staticmethod
    def close(world):
        if world > 1:
            dist_.close()


def _progress_bar(iterable, total, desc, enabled, stream=None):
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
