"""The training loop: an embedding trained with PDDM hard mining (or a baseline) on the training
half of the classes, evaluated by retrieval on the other half after every epoch.

``train(TrainConfig(...))`` is what ``pddm-ext train`` runs. Each epoch it shows a tqdm bar with
the loss and the mining statistics, appends a line to ``<out>/log.jsonl``, writes
``<out>/checkpoint.pt`` atomically (model, PDDM unit, optimiser, epoch, every RNG state, config);
at the end it draws Recall@1 per epoch in ``<out>/recall_at_1.png``. ``resume=True`` continues from the checkpoint and gives the
same numbers as an uninterrupted run.

Losses (``loss=``), all on L2-normalised embeddings f, with the triplet hinge
``[beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+`` as the Euclidean embedding loss:

- ``pddm``: :class:`pddm_ext.PDDMLoss` (SPEC §4): PDDM mines hard quadruplets, the double-header
  hinge trains the PDDM unit and (through its scores) the embedding, plus ``lam`` x the embedding loss.
- ``pddm-triplet``: the same PDDM mining and the same metric loss for the unit, but the embedding
  learns only from the Euclidean triplet loss on the mined triplets (the paper's "PDDM + triplet").
- ``batch-hard``: Euclidean batch-hard mining (hardest positive and negative per anchor).
- ``triplet-random``: one random positive and one random negative per anchor.

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
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import batch_hard, mine_hard
from ..integrations import distributed as dist_
from ..modules import PDDM, PDDMLoss
from . import datasets as data_mod
from . import evaluate as ev
from .models import build_model, torchvision_available

LOSSES = ("pddm", "pddm-triplet", "batch-hard", "triplet-random")
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PLOT = "recall_at_1.png"


class ConfigError(ValueError):
    """A configuration that cannot train (one-line message, raised before any training)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and result."""

    dataset: str = "mnist5k"
    loss: str = "pddm"
    epochs: int = 8
    p: int | None = None  # classes per batch; default min(8, number of training classes)
    k: int = 8  # images per class in a batch
    batches_per_epoch: int | None = None  # default: training images // (P K)
    lr: float = 1e-3
    unit_lr: float | None = None  # Adam lr of the PDDM unit (PDDM losses); default: lr (one param group)
    embedding_dim: int = 64
    mine_k: int | None = None  # hard positive pairs mined per batch (PDDM losses); default P K / 2
    alpha: float = 0.5  # PDDM metric-loss margin
    beta: float = 1.0  # embedding (triplet) margin on squared distances
    lam: float = 0.5  # weight of the embedding loss in the PDDM losses
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    out: str | None = None  # default: runs/<dataset>-<loss>-seed<seed>
    backbone: str = "auto"  # auto | small | resnet18
    font_dirs: list | None = None  # glyphs: where to look for fonts (default: the system dirs)
    image_size: int | None = None  # folder: default 224 (resnet18) or 64 (small CNN)
    # CPU threads for torch. Default 1: the small CNN gains little from more, and on a shared
    # machine extra OpenMP threads spin-wait for busy cores (measured 10-20x slower epochs).
    threads: int | None = None

    def resolved_out(self):
        if self.out:
            return self.out
        name = self.dataset.replace("/", "_").replace(":", "-").strip("_")
        return os.path.join("runs", f"{name}-{self.loss}-seed{self.seed}")


# --- configuration checks ---------------------------------------------------------------------


def check_config(cfg):
    """Every check that needs no data: raises ConfigError with a one-line message."""
    if not isinstance(cfg.dataset, str) or not (
        cfg.dataset in ("mnist5k", "digits", "glyphs") or cfg.dataset.startswith("folder:")
    ):
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; expected one of {', '.join(data_mod.DATASETS)}")
    if cfg.dataset.startswith("folder:"):
        path = cfg.dataset[len("folder:"):]
        if not path or not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"dataset {cfg.dataset}: folder {path!r} does not exist")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
    if cfg.k < 2:
        raise ConfigError(f"K (images per class in a batch) must be >= 2 so every class has a positive pair, got {cfg.k}")
    if cfg.p is not None and cfg.p < 2:
        raise ConfigError(f"P (classes per batch) must be >= 2 so every batch has negatives, got {cfg.p}")
    for name in ("epochs", "embedding_dim"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.batches_per_epoch is not None and cfg.batches_per_epoch < 1:
        raise ConfigError(f"batches_per_epoch must be >= 1, got {cfg.batches_per_epoch}")
    if cfg.mine_k is not None and cfg.mine_k < 1:
        raise ConfigError(f"mine_k must be >= 1, got {cfg.mine_k}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.unit_lr is not None and not cfg.unit_lr > 0:
        raise ConfigError(f"unit_lr must be > 0, got {cfg.unit_lr}")
    if cfg.backbone not in ("auto", "small", "resnet18"):
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; expected auto, small or resnet18")
    if cfg.backbone == "resnet18" and not torchvision_available():
        raise ConfigError("backbone resnet18 needs torchvision, which is not importable here (use --backbone small)")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch.cuda.is_available() is False")


def resolve_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}") from exc


def check_against_data(cfg, split):
    """The checks that need the dataset: P against the number of training classes."""
    n = split.num_train_classes
    if n < 2:
        raise ConfigError(f"dataset {cfg.dataset} has {n} training class(es); needs at least 2")
    if cfg.p is not None and cfg.p > n:
        raise ConfigError(f"P = {cfg.p} classes per batch but dataset {cfg.dataset} has only {n} training classes")


# --- losses -------------------------------------------------------------------------------------


def triplet_hinge(f, a, p, n, beta):
    """[beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+ per triplet, and the two squared distances."""
    d_ap = ((f[a] - f[p]) ** 2).sum(1)
    d_an = ((f[a] - f[n]) ** 2).sum(1)
    return torch.relu(beta + d_ap - d_an), d_ap, d_an


def _zero(embeddings, module):
    zero = embeddings.sum() * 0
    for param in module.parameters():
        zero = zero + param.sum() * 0
    return zero


class EuclideanTripletLoss(nn.Module):
    """Triplet loss on L2-normalised embeddings with Euclidean batch-hard or random triplets."""

    def __init__(self, mining, beta=1.0):
        super().__init__()
        self.mining, self.beta = mining, beta
        self.stats = {}

    def _random_triplets(self, labels):
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        anchors = (pos.any(1) & neg.any(1)).nonzero().flatten()
        # multinomial draws from torch's global RNG, which checkpoints save and restore
        p = torch.multinomial(pos[anchors].float(), 1).flatten()
        n = torch.multinomial(neg[anchors].float(), 1).flatten()
        return anchors, p, n

    def forward(self, embeddings, labels):
        f = F.normalize(embeddings, dim=1)
        labels = labels.to(f.device)
        if self.mining == "batch-hard":
            a, p, n = batch_hard(f.detach(), labels, metric="euclidean")
        else:
            a, p, n = self._random_triplets(labels)
        if a.numel() == 0:
            self.stats = dict(tuples=0, active=0.0)
            return _zero(embeddings, self)
        hinge, d_ap, d_an = triplet_hinge(f, a, p, n, self.beta)
        self.stats = dict(tuples=int(a.numel()), active=float((hinge > 0).float().mean()),
                          d_ap=float(d_ap.detach().mean()), d_an=float(d_an.detach().mean()))
        return hinge.mean()


class PDDMTripletLoss(nn.Module):
    """PDDM mining with a Euclidean embedding loss only (the paper's "PDDM + triplet").

    The unit is trained by the double-header hinge on detached features (so it keeps learning what
    to mine); the embedding learns only from the triplet hinge on the mined triplets
    ``Quadruplets.as_triplets()`` (two per quadruplet).
    """

    def __init__(self, embedding_dim, *, alpha=0.5, beta=1.0, lam=0.5, k=1):
        super().__init__()
        self.unit = PDDM(embedding_dim)
        self.alpha, self.beta, self.lam, self.k = alpha, beta, lam, k
        self.last_quadruplets = self.last_metric_loss = self.last_embedding_loss = None

    def forward(self, embeddings, labels):
        f = F.normalize(embeddings, dim=1)
        fd = f.detach()
        quads = mine_hard(fd, labels, self.unit, k=self.k)
        self.last_quadruplets = quads
        if quads.anchor.numel() == 0:
            self.last_metric_loss = self.last_embedding_loss = torch.zeros(())
            return _zero(embeddings, self)
        i, j, k_, l_ = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
        s_ij = self.unit.pair_scores(fd[i], fd[j])
        e_m = torch.relu(self.alpha + self.unit.pair_scores(fd[i], fd[k_]) - s_ij) + torch.relu(
            self.alpha + self.unit.pair_scores(fd[j], fd[l_]) - s_ij)
        a, p, n = quads.as_triplets()
        hinge, _, _ = triplet_hinge(f, a, p, n, self.beta)
        metric_loss, embedding_loss = e_m.mean(), hinge.mean()
        self.last_metric_loss, self.last_embedding_loss = metric_loss.detach(), embedding_loss.detach()
        return metric_loss + self.lam * embedding_loss


def build_loss(cfg, p):
    """The loss module for ``cfg.loss`` (P classes per batch fixes the default mining k)."""
    mine_k = cfg.mine_k or max(1, p * cfg.k // 2)
    if cfg.loss == "pddm":
        return PDDMLoss(cfg.embedding_dim, alpha=cfg.alpha, beta=cfg.beta, lam=cfg.lam, k=mine_k)
    if cfg.loss == "pddm-triplet":
        return PDDMTripletLoss(cfg.embedding_dim, alpha=cfg.alpha, beta=cfg.beta, lam=cfg.lam, k=mine_k)
    return EuclideanTripletLoss(cfg.loss, beta=cfg.beta)


def build_optimizer(cfg, model, loss_fn):
    """Adam over the network and the loss's parameters (the PDDM unit). With ``cfg.unit_lr`` set, the
    unit is a second param group with that learning rate; unset, one group at ``cfg.lr`` as before."""
    if cfg.unit_lr is None or not list(loss_fn.parameters()):
        return torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr)
    return torch.optim.Adam([dict(params=list(model.parameters())),
                             dict(params=list(loss_fn.parameters()), lr=cfg.unit_lr)], lr=cfg.lr)


def batch_stats(loss_fn):
    """Mining statistics of the last batch: tuples mined, fraction of active hinges, mean scores."""
    if isinstance(loss_fn, EuclideanTripletLoss):
        return dict(loss_fn.stats)
    quads = loss_fn.last_quadruplets
    out = dict(tuples=int(quads.anchor.numel()))
    if quads.anchor.numel():
        s = quads.scores
        out.update(s_pos=float(s[:, 0].mean()), s_neg=float(s[:, 1:].mean()),
                   # fraction of mined (pair, negative) where the negative scores above the positive
                   violated=float((s[:, 1:] >= s[:, :1]).float().mean()),
                   metric_loss=float(loss_fn.last_metric_loss), embedding_loss=float(loss_fn.last_embedding_loss))
    return out


# --- RNG, checkpoints, logs, plots ----------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(sampler):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                 sampler=sampler.generator.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, sampler):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    sampler.generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def format_table(history, floor):
    """The final table: one row per epoch and the raw-pixel floor."""
    cols = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi"]
    head = f"{'epoch':>5} {'loss':>8} " + " ".join(f"{c.upper().replace('RECALL', 'R'):>6}" for c in cols) + f" {'time s':>7}"
    lines = [head, "-" * len(head)]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['loss']:>8.4f} " + " ".join(f"{h[c]:>6.3f}" for c in cols)
                     + f" {h['train_time']:>7.1f}")
    lines.append(f"{'raw pixels':>14} " + " ".join(f"{floor[c]:>6.3f}" for c in cols))
    return "\n".join(lines)


# --- the loop ---------------------------------------------------------------------------------


def _say(progress, msg):
    if progress:
        print(msg, file=sys.stderr, flush=True)


def prepare(cfg):
    """Checks the configuration and loads the data; every error here comes before any training."""
    check_config(cfg)
    image_size = cfg.image_size
    if cfg.dataset.startswith("folder:") and image_size is None:
        image_size = 224 if (cfg.backbone != "small" and torchvision_available()) else 64
    split = data_mod.load_dataset(cfg.dataset, font_dirs=cfg.font_dirs, image_size=image_size)
    check_against_data(cfg, split)
    return split


def train(cfg, *, resume=False, progress=True, split=None):
    """Runs (or with ``resume=True`` continues) a training run; returns the result dict
    (config, dataset info, raw-pixel floor, per-epoch history, output folder)."""
    out = cfg.resolved_out()
    ckpt_path = os.path.join(out, CHECKPOINT)
    checkpoint = None
    if resume:
        if not os.path.exists(ckpt_path):
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**checkpoint["config"])
        # a resumed run keeps its configuration; only the epoch budget, device and threads may change
        cfg = dataclasses.replace(saved, epochs=cfg.epochs, device=cfg.device, threads=cfg.threads, out=out)
    if split is None:
        split = prepare(cfg)
    else:
        check_config(cfg)
        check_against_data(cfg, split)
    device = dist_.init_from_env(resolve_device(cfg.device))  # [ddp] joins torchrun's process group
    world, is_main = dist_.world_size(), dist_.rank() == 0  # [ddp]
    progress = progress and is_main  # [ddp]
    p = cfg.p or min(8, split.num_train_classes)
    if device.type == "cpu" or cfg.threads:
        torch.set_num_threads(cfg.threads or 1)

    seed_everything(cfg.seed)
    model, model_desc = build_model(split.image_shape, cfg.embedding_dim, backbone=cfg.backbone)
    loss_fn = build_loss(cfg, p)
    model.to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(cfg, model, loss_fn)
    sampler = data_mod.PKSampler(split.train_labels, p, cfg.k, num_batches=cfg.batches_per_epoch,
                                 seed=cfg.seed)
    train_model, train_loss, batch_sampler = _distribute(model, loss_fn, sampler, device, world)  # [ddp]
    history, start_epoch, train_time = [], 0, 0.0
    floor = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"], sampler)
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        train_time, floor = checkpoint["train_time"], checkpoint["floor"]
    if is_main:  # [ddp]
        os.makedirs(out, exist_ok=True)
    info = {k: v for k, v in split.info.items()}
    if floor is None:
        # a property of the dataset (k-means seeded with 0), so computed once per split
        floor = split.__dict__.get("_pixel_floor") or ev.pixel_floor(split.test, seed=0)
        split.__dict__["_pixel_floor"] = floor
    result = dict(config=dataclasses.asdict(cfg), dataset=info, model=model_desc, floor=floor,
                  history=history, out=out, batch=dict(p=p, k=cfg.k, batches_per_epoch=len(sampler)))
    if is_main:  # [ddp]
        write_text_atomic(os.path.join(out, LOG), "".join(json.dumps(h) + "\n" for h in history))
    _say(progress, f"{cfg.dataset}: {len(split.train)} training images ({split.num_train_classes} classes), "
                   f"{len(split.test)} test images; model {model_desc}, loss {cfg.loss}, P={p} K={cfg.k}, "
                   f"{len(sampler)} batches/epoch, device {device}; writing {out}")
    if resume:
        _say(progress, f"resuming after epoch {start_epoch} of {cfg.epochs}")

    tensor_data = isinstance(split.train, data_mod.TensorImages)
    loader = None if tensor_data else torch.utils.data.DataLoader(split.train, batch_sampler=batch_sampler)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        losses, stats_sum, stats_n = [], {}, {}
        t0 = time.perf_counter()
        batches = ((split.train.images[b], split.train.labels[b]) for b in batch_sampler) if tensor_data else loader
        bar = _progress_bar(batches, len(sampler), f"epoch {epoch + 1}/{cfg.epochs}", progress)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device)
            loss = train_loss(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            for key, value in batch_stats(loss_fn).items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value
                stats_n[key] = stats_n.get(key, 0) + 1
            if progress:
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", tuples=stats_sum.get("tuples", 0) / max(1, stats_n.get("tuples", 1)),
                                refresh=False)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        emb, labels = ev.embed(model, split.test, device=device)
        metrics = ev.retrieval_metrics(emb, labels, seed=cfg.seed)
        entry = dict(epoch=epoch + 1, loss=float(np.mean(losses)),
                     mining={k: stats_sum[k] / stats_n[k] for k in stats_sum}, **metrics,
                     epoch_time=epoch_time, train_time=train_time)
        history.append(entry)
        if not is_main:  # [ddp] rank 0 writes
            continue
        save_atomic(dict(model=model.state_dict(), loss=loss_fn.state_dict(), optimizer=optimizer.state_dict(),
                         epoch=epoch + 1, rng=rng_state(sampler), config=dataclasses.asdict(cfg),
                         history=history, train_time=train_time, floor=floor, dataset=info), ckpt_path)
        with open(os.path.join(out, LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")
        _say(progress, f"epoch {epoch + 1}: loss {entry['loss']:.4f}  R@1 {entry['recall@1']:.3f}  "
                       f"R@8 {entry['recall@8']:.3f}  NMI {entry['nmi']:.3f}  ({epoch_time:.1f} s)")
    if history and is_main:  # [ddp] rank 0 writes
        plot_recall(history, floor, os.path.join(out, PLOT), f"{cfg.dataset}, loss {cfg.loss}, seed {cfg.seed}")
    if is_main:  # [ddp]
        write_text_atomic(os.path.join(out, "result.json"), json.dumps(result, indent=1))
    if world > 1:  # [ddp]
        dist_.close()
    return result


def _distribute(model, loss_fn, sampler, device, world):
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


def _progress_bar(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
