"""The training loop: an embedding trained with PDDM hard mining (or a baseline) on the training
half of the classes, evaluated by retrieval on the other half after every epoch.

``train(TrainConfig(...))`` is what ``pddm-ext train`` runs: a :class:`Run` (setup, then per epoch
``train_epoch`` / ``evaluate`` / ``save``, then ``finish``). Each epoch shows a progress bar (only
when stderr is a terminal) with the loss and the mining statistics, prints a summary line (always), appends a line to ``<out>/log.jsonl``, writes
``<out>/checkpoint.pt`` atomically (model, PDDM unit, optimiser, epoch, every RNG state, config);
at the end it draws Recall@1 per epoch in ``<out>/recall_at_1.png``.
``resume=True`` continues from the checkpoint and gives the same numbers as an uninterrupted run of
the same epoch budget; a new budget (``--epochs``) re-plans the one-cycle schedule (``one_cycle``)
and is recorded in ``budget_changes`` of the checkpoint and ``result.json``.

Around the loop, each in its own module: the configuration and its checks (``config``), the lines,
table, plot and TensorBoard scalars (``report``), the hold-out split (``holdout``), DDP (``ddp``), the
losses and the optimiser (``losses``: ``loss=`` pddm, pddm-triplet, batch-hard, triplet-random, built
from the library's ``PDDMLoss`` and ``batch_hard`` and pytorch-metric-learning's ``TripletMarginLoss``),
checkpoints and seeding (``checkpoint``), the networks (``models``) and the data (``datasets``).

The PDDM unit's parameters are in the same optimiser as the network's (Adam at ``lr``, or at
``unit_lr`` in a second param group when that is set).

Multi-process (``torchrun --nproc_per_node N pddm-ext train ...``, DDP on gloo or nccl): a step equals
one single-process step on the whole batch (up to BatchNorm statistics on CPU: see ``ddp``). Rank 0
alone prints and writes the log, plot, result and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from .. import collectives
from ..integrations import distributed as dist_
from ..sampler import PKSampler
from . import datasets as data_mod
from . import ddp
from . import diagnostics as diag_mod
from . import evaluate as ev
from .augment import random_affine
from .checkpoint import load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state
from .config import (ConfigError, check_against_data, check_config, prepare, resolve_device, resolved_defaults,
                     resumed_config, tensorboard_writer_class)
from .holdout import holdout_split
from .losses import batch_stats, build_loss, build_optimizer
from .models import build_model
from .report import format_epoch, plot_recall, progress_bar, scalars, write_text_atomic

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PLOT = "recall_at_1.png"


class DivergenceError(RuntimeError):
    """Training diverged: the network's embeddings or the loss became NaN or Inf (one-line message;
    the checkpoint of the last finished epoch stays as it was)."""


class Run:
    """One training run. ``train()`` is the whole loop::

        run = Run(cfg, resume=..., progress=..., split=...)   # setup: data, model, loss, optimiser, resume
        for epoch in run.epochs():
            entry = run.train_epoch(epoch)                     # one pass of P x K batches
            entry.update(run.evaluate())                       # retrieval metrics on the test classes
            run.save(entry)                                    # log line, checkpoint, summary line
        return run.finish()                                    # plot and result.json

    Under torchrun the distributed parts live in ``setup`` alone (``ddp``): the process group,
    DDP around the model and the loss, this rank's share of each batch; afterwards only ``is_main``
    (rank 0 writes) tells the ranks apart.
    """

    def __init__(self, cfg, *, resume=False, progress=True, split=None, explicit=None):
        cfg = resolved_defaults(cfg)
        self.out = cfg.resolved_out()
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        if not resume and os.path.exists(self.ckpt_path):
            raise ConfigError(f"{self.out} already holds a run ({CHECKPOINT}): use --resume to continue it, "
                              "or another --out (or delete the folder) to start a new one")
        checkpoint = self._load_checkpoint(cfg) if resume else None
        if checkpoint is not None:
            cfg = resumed_config(cfg, checkpoint, explicit, self.out)
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
        device, world = ddp.init(resolve_device(cfg.device))
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
        max_lrs = [g["lr"] for g in self.optimizer.param_groups]
        total_steps = cfg.epochs * len(self.sampler)
        # one cycle over the whole run (Smith & Topin 2019), peak at lr
        self.scheduler = one_cycle(self.optimizer, max_lrs, total_steps) if cfg.schedule == "onecycle" else None
        self.train_model, self.train_loss, self.batch_sampler = ddp.wrap(
            self.model, self.loss_fn, self.sampler, device, world)
        self.history, self.start_epoch, self.train_time, floor = [], 0, 0.0, None
        # each resume that changed the epoch budget: {"after_epoch", "epochs_before", "epochs"}
        self.budget_changes, changed, replanned = [], False, None
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.loss_fn.load_state_dict(checkpoint["loss"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.history, self.start_epoch = checkpoint["history"], checkpoint["epoch"]
            self.budget_changes = list(checkpoint.get("budget_changes", []))
            saved_epochs = checkpoint["config"]["epochs"]
            changed = saved_epochs != cfg.epochs
            if changed:
                self.budget_changes.append(dict(after_epoch=self.start_epoch, epochs_before=saved_epochs,
                                                epochs=cfg.epochs))
            if self.scheduler is not None:
                saved_scheduler = checkpoint["scheduler"]
                if saved_scheduler["total_steps"] == total_steps:  # the same cycle: continues exactly
                    self.scheduler.load_state_dict(saved_scheduler)
                else:
                    # A new budget re-plans the cycle: from here on the lr (and Adam's beta1) are those
                    # of a straight run of the new budget at this step. Stretching the saved cycle
                    # instead would let OneCycleLR's cosine run past its end, where the lr climbs
                    # back towards the peak and the run would end far from annealed.
                    lr_before = [g["lr"] for g in self.optimizer.param_groups]
                    self.scheduler = one_cycle(self.optimizer, max_lrs, total_steps, saved_scheduler["last_epoch"])
                    replanned = (lr_before, [g["lr"] for g in self.optimizer.param_groups])
            set_rng_state(checkpoint["rng"], self.sampler.generator)
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
        # a budget change with nothing left to train is still one (the run ends short of its plan): the
        # checkpoint is rewritten at the end so that it agrees with result.json
        self.rewrite_checkpoint = changed and self.start_epoch == cfg.epochs
        if changed:
            self.say(budget_change_line(self.budget_changes[-1], replanned, cfg.schedule))
        elif replanned is not None:  # same budget, other steps per epoch (batches_per_epoch None: other data)
            self.say(f"warning: the one-cycle schedule is re-planned for {total_steps} steps ({len(self.sampler)} "
                     f"batches per epoch), where the saved run planned {checkpoint['scheduler']['total_steps']}: "
                     "its training data differs from this run's")

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
        if self.cfg.freeze_bn:  # running statistics fixed; weights (BN's scale and shift included) still train
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        losses, stats_sum, stats_n = [], {}, {}
        t0 = time.perf_counter()
        batches = self.batches()
        bar = progress_bar(batches, len(self.sampler), f"epoch {epoch + 1}/{self.cfg.epochs}", self.progress)
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
        self.write_checkpoint()
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

    def write_checkpoint(self):
        """Rank 0's atomic checkpoint of the run as it stands (after the last finished epoch)."""
        save_atomic(dict(model=self.model.state_dict(), loss=self.loss_fn.state_dict(),
                         scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
                         optimizer=self.optimizer.state_dict(), epoch=self.history[-1]["epoch"],
                         rng=rng_state(self.sampler.generator),
                         config=dataclasses.asdict(self.cfg), history=self.history, train_time=self.train_time,
                         floor=self.floor, dataset=self.info, budget_changes=self.budget_changes), self.ckpt_path)

    def finish(self):
        """Rank 0 draws the plot and writes result.json; the process group started here is closed.
        Returns the result dict (config, dataset, model, raw-pixel floor, history, out, batch)."""
        cfg = self.cfg
        result = dict(config=dataclasses.asdict(cfg), dataset=self.info, model=self.model_desc, floor=self.floor,
                      history=self.history, out=self.out,
                      batch=dict(p=self.p, k=cfg.k, batches_per_epoch=len(self.sampler)),
                      budget_changes=self.budget_changes)
        if self.is_main:
            if self.rewrite_checkpoint:
                self.write_checkpoint()
            if self.history:
                plot_recall(self.history, self.floor, os.path.join(self.out, PLOT),
                            f"{cfg.dataset}, loss {cfg.loss}, seed {cfg.seed}")
            write_text_atomic(os.path.join(self.out, "result.json"), json.dumps(result, indent=1))
        if self.tensorboard is not None:
            self.tensorboard.close()
        ddp.close(self.world)
        return result


def budget_change_line(change, replanned, schedule):
    """The line a resume prints when it changed the epoch budget: ``change`` as recorded in
    budget_changes; ``replanned``: (lrs before, lrs after) per param group when the one-cycle schedule
    was re-planned, else None."""
    before, after, trained = change["epochs_before"], change["epochs"], change["after_epoch"]
    line = f"the epoch budget changed from {before} to {after} epochs (recorded in budget_changes)"
    if after == trained:
        return f"{line}: nothing is left to train; the run ends after epoch {trained}, planned for {before}"
    if replanned is not None:
        lrs = " / ".join(f"{a:.3g} (was {b:.3g})" for b, a in zip(*replanned))
        return (f"{line}: the one-cycle schedule is re-planned for {after} epochs; lr now {lrs}, a straight "
                f"{after}-epoch run's values at this step; the steps before followed the {before}-epoch cycle, "
                f"so the run as a whole is not a straight {after}-epoch run")
    if schedule == "constant":
        return f"{line}: with a constant lr the run continues as a straight {after}-epoch run would"
    return line


def one_cycle(optimizer, max_lrs, total_steps, done_steps=0):
    """``torch.optim.lr_scheduler.OneCycleLR`` over ``total_steps`` optimiser steps, peaking at
    ``max_lrs`` (one per param group), advanced by ``done_steps``: the optimiser's lr and Adam's beta1
    are then the schedule's values after that many steps, as in a straight run of ``total_steps``."""
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            scheduler.step()
    return scheduler


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
