"""A training run's configuration: ``TrainConfig`` (every field a run depends on), the values of fields
added since the first runs in runs saved before them (``LEGACY_DEFAULTS``, ``saved_config``: how an old
checkpoint or result.json reads today), what a resumed run may change (``resumed_config``), and the
checks that stop a bad configuration with a one-line ``ConfigError`` before any training:
``check_config`` (no data needed; with ``resolve_device`` and ``tensorboard_writer_class``),
``check_against_data`` (the loaded split), and ``prepare`` (both, around loading the dataset).

The value rules are those of the command line (``pddm_ext.app.options``); ``PDDMLoss``'s options come
from their declarations (``pddm_ext.modules.LOSS_OPTIONS`` as ``pddm_ext.app.loss_options`` reads them).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from . import datasets as data_mod
from . import evaluate as ev
from . import extra_hint, loss_options, options
from .loss_options import train_default
from .losses import LOSSES
from .models import BACKBONES, ModelError, efficientnet_lite0_weights, resolve_backbone, torchvision_available


class ConfigError(ValueError):
    """A configuration that cannot train (one-line message, raised before any training)."""


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
    # batch-norm layers kept in eval mode while training: running statistics stay those the network
    # started with (the pretrained ones); their scale and shift still learn (Run.train_epoch).
    # None: on with pretrained weights, off otherwise (resolved_defaults); small augmented P x K
    # batches pull ImageNet statistics away from what the weights expect (docs/experiments.md,
    # "Fine-tuning the backbone"), while a network trained from scratch needs its own
    freeze_bn: bool | None = None
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
_APP_LEGACY_DEFAULTS = dict(augment=False, schedule="constant", holdout=0.0, freeze_bn=False)


def resolved_defaults(cfg):
    """``cfg`` with the defaults that depend on other fields made explicit (what a run records and
    compares): ``freeze_bn`` None becomes ``pretrained``."""
    if cfg.freeze_bn is None:
        return dataclasses.replace(cfg, freeze_bn=bool(cfg.pretrained))
    return cfg


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


def resumed_config(cfg, checkpoint, explicit, out):
    """The configuration a resumed run continues with: the one saved in ``checkpoint`` (through
    :func:`saved_config`) with the epoch budget (``cfg.epochs`` when ``explicit`` is None or names it,
    else the saved one) and the runtime fields of ``cfg`` (``RUNTIME_FIELDS``, ``out``). ConfigError when
    a field in ``explicit`` (the ones the caller set on purpose) differs from the saved one, or when the
    budget is below the epochs already trained."""
    saved = saved_config(checkpoint["config"])
    changed = [f"{name} {getattr(cfg, name)!r} (the run has {getattr(saved, name)!r})"
               for name in sorted(explicit or ())
               if name not in ("epochs", *TrainConfig.RUNTIME_FIELDS)
               and getattr(cfg, name) != getattr(saved, name)]
    if changed:
        raise ConfigError(f"--resume continues the run in {out} with its own configuration; it cannot "
                          f"change {', '.join(changed)}: start a new run (another --out) instead")
    epochs = cfg.epochs if explicit is None or "epochs" in explicit else saved.epochs
    if epochs < checkpoint["epoch"]:
        raise ConfigError(f"--resume: the run in {out} has trained {checkpoint['epoch']} epochs, more "
                          f"than --epochs {epochs}")
    return dataclasses.replace(saved, epochs=epochs, device=cfg.device,
                               threads=cfg.threads, tensorboard=cfg.tensorboard, out=out)


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


def resolve_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}") from exc


def check_against_data(cfg, split):
    """The checks that need the dataset: P against the number of training classes, and a test half on
    which every retrieval metric is defined (``evaluate.evaluation_problem``). Warns (``UserWarning``)
    when K exceeds a training class's size: the sampler then repeats that class's images."""
    problem = ev.evaluation_problem(split.test_labels, class_names=split.info.get("test_classes"))
    if problem:
        raise ConfigError(f"dataset {cfg.dataset} cannot be evaluated: {problem}")
    n = split.num_train_classes
    if n < 2:
        raise ConfigError(f"dataset {cfg.dataset} has {n} training class(es); needs at least 2")
    if cfg.p is not None and cfg.p > n:
        raise ConfigError(f"P = {cfg.p} classes per batch but dataset {cfg.dataset} has only {n} training classes")
    counts = torch.bincount(torch.as_tensor(split.train_labels).long())
    counts = counts[counts > 0]
    if cfg.k > int(counts.min()):
        small = int((counts < cfg.k).sum())
        warnings.warn(f"K = {cfg.k} samples per class, but {small} of the {n} training classes of dataset "
                      f"{cfg.dataset} have fewer images (smallest: {int(counts.min())}): the P x K sampler draws "
                      "those with replacement, so their batches repeat images (identical positive pairs)",
                      UserWarning, stacklevel=2)
    if cfg.pretrained and resolve_backbone(split.image_shape, cfg.backbone) == "small":
        c, h, w = split.image_shape
        raise ConfigError(f"--pretrained needs the resnet18 backbone, but --backbone {cfg.backbone} gives dataset "
                          f"{cfg.dataset} ({c} x {h} x {w} images) the small CNN, which has no pretrained weights "
                          f"(auto takes resnet18 for 3-channel images of 64 px or more when torchvision is installed; "
                          f"--backbone efficientnet-lite0 takes any images)")


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
