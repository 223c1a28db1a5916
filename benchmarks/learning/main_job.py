"""Which training recipe makes a learned embedding beat raw pixels on unseen classes?

Trains the app's small CNN (``pddm_ext.app.models.build_model``) on the training half of the classes of
a dataset of the app (``pddm_ext.app.datasets``) and reports Recall@1 on the unseen half against raw
pixels (``pddm_ext.app.evaluate``). One change at a time can be switched on, so that each gain can be
attributed: random affine augmentation (``--augment``), a one-cycle learning-rate schedule
(``--schedule onecycle``), the batch shape (``-P``, ``-K``), the number of steps, the loss
(``--loss pddm`` with ``--options`` passed to ``pddm_ext.PDDMLoss``, or ``batch-hard``: the Euclidean
triplet loss on batch-hard triplets with margin ``--beta``).

    python benchmarks/learning/main_job.py --dataset glyphs --steps 600 --augment --schedule onecycle \\
        --loss pddm --options '{"k": null, "bce_weight": 1.0}' --seeds 0 1 2

Prints one line per evaluation and per seed; ``--json`` appends the results to a file.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import pddm_ext
from pk import pk_batches  # the scripts' folder is on sys.path when run as a script
from pddm_ext.app import datasets as data_mod
from pddm_ext.app import evaluate as ev
from pddm_ext.app.augment import random_affine
from pddm_ext.app.diagnostics import pair_diagnostics
from pddm_ext.app.models import build_model


def build_loss(cfg, dim):
    if cfg.loss == "pddm":
        return pddm_ext.PDDMLoss(dim, **cfg.options)
    beta = cfg.beta

    def batch_hard_loss(emb, labels):
        f = F.normalize(emb, dim=1)
        a, p, n = pddm_ext.batch_hard(f.detach(), labels, metric="euclidean")
        return torch.relu(beta + ((f[a] - f[p]) ** 2).sum(1) - ((f[a] - f[n]) ** 2).sum(1)).mean()
    return batch_hard_loss


def run(cfg, seed, split, floor):
    torch.manual_seed(seed)
    model, _ = build_model(split.image_shape, cfg.dim, backbone="small")
    loss_fn = build_loss(cfg, cfg.dim)
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
             if cfg.schedule == "onecycle" else None)
    g = torch.Generator().manual_seed(seed)
    batches = pk_batches(split.train_labels, cfg.p, cfg.k, g)
    images = split.train.images
    t0 = time.time()
    curve = []
    for step in range(cfg.steps):
        idx = next(batches)
        x, y = images[idx], split.train_labels[idx]
        if cfg.augment:
            x = random_affine(x, generator=g)
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            emb, labels = ev.embed(model, split.test)
            r1 = ev.recall_at_k(emb, labels, (1,))[1]
            curve.append(dict(step=step + 1, recall_at_1=r1, seconds=time.time() - t0, loss=float(loss.detach())))
            extra = ""
            if cfg.loss == "pddm":
                unit = pair_diagnostics(emb, labels, loss_fn.unit)
                curve[-1].update(unit_spread=unit["spread"], unit_auc=unit["auc_S"], metric_loss=float(loss_fn.last_metric_loss))
                extra = (f"  E_m {float(loss_fn.last_metric_loss):.3f}  unit on unseen pairs: spread {unit['spread']:.4f} "
                         f"AUC S {unit['auc_S']:.3f} / -d^2 {unit['auc_euclidean']:.3f}")
            print(f"    step {step + 1}: loss {float(loss):.4f}{extra}  test R@1 {r1:.3f}  "
                  f"(pixels {floor:.3f})  {time.time() - t0:.0f} s", flush=True)
    return dict(recall_at_1=curve[-1]["recall_at_1"], seconds=time.time() - t0, curve=curve)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="glyphs", choices=["mnist5k", "glyphs", "digits"])
    ap.add_argument("--loss", default="pddm", choices=["pddm", "batch-hard"])
    ap.add_argument("--options", type=json.loads, default={}, help="PDDMLoss keyword options, JSON")
    ap.add_argument("--beta", type=float, default=0.2, help="batch-hard margin (squared distances)")
    ap.add_argument("-P", "--p", type=int, default=8)
    ap.add_argument("-K", "--k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--schedule", default="constant", choices=["constant", "onecycle"])
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default=None)
    ap.add_argument("--json", default=None)
    cfg = ap.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    split = data_mod.load_dataset(cfg.dataset)
    floor = ev.recall_at_k(F.normalize(split.test.images.flatten(1), dim=1), split.test_labels, (1,))[1]
    label = cfg.label or " ".join(f"{k}={v}" for k, v in vars(cfg).items()
                                  if k not in ("json", "label", "seeds", "threads", "eval_every"))
    print(label, flush=True)
    rows = []
    for seed in cfg.seeds:
        r = run(cfg, seed, split, floor)
        rows.append(r)
        print(f"  seed {seed}: test R@1 {r['recall_at_1']:.3f} (pixels {floor:.3f}) in {r['seconds']:.0f} s", flush=True)
    mean = sum(r["recall_at_1"] for r in rows) / len(rows)
    print(f"{label}: mean test R@1 {mean:.3f}  pixels {floor:.3f}", flush=True)
    if cfg.json:
        with open(cfg.json, "a") as fh:
            fh.write(json.dumps(dict(label=label, config={k: v for k, v in vars(cfg).items() if k != "json"},
                                     pixels=floor, seeds=rows, mean_recall_at_1=mean)) + "\n")


if __name__ == "__main__":
    main()
