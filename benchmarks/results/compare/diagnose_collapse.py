"""Why the PDDM unit "collapses" in `pddm-ext compare` (metric loss stuck at 2 alpha): the evidence.

Trains the compare setting (mnist5k, small CNN, P=5 x K=8, seed 0, one thread) for a few dozen steps
under several configurations and prints, every few steps, on the current batch (all its pairs):

- q_on:   fraction of (pair, joint unit) with q > 0, and how many of the c joint units fire for some pair
          (the dead-ReLU hypothesis: q == 0 everywhere would make S == b_s and freeze the unit);
- |g|:    gradient norm of the unit's parameters (W_u, b_u, W_v, b_v, W_c, b_c, w_s together) this step;
- S std:  spread of the unit's scores over the batch's pairs, to compare with the margin alpha = 0.5;
- AUC S / AUC d: probability that a random positive pair scores above a random negative pair, by the
          unit's S and by -|f_a - f_b|^2 (0.5 = the metric ranks pairs at random);
- tail:   max S over negative pairs - min S over positive pairs (what the hardest-pair hinge sees);
- E_m, E_e: the metric and embedding parts of the loss.

Usage (repo root):  .venv/bin/python benchmarks/results/compare/diagnose_collapse.py [--steps 60] [--every 10]
                    [--dataset glyphs -K 4] [--configs default "mine_k all" ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from pddm_ext import PKSampler
from pddm_ext.app import datasets as data_mod
from pddm_ext.app.models import build_model
from pddm_ext.app.checkpoint import seed_everything
from pddm_ext.app.config import TrainConfig
from pddm_ext.app.losses import build_loss, build_optimizer

CONFIGS = {  # name -> TrainConfig overrides (on top of the compare settings)
    "default (lr 1e-3, mine_k P K/2, beta 1)": {},
    "unit_lr 1e-4": dict(unit_lr=1e-4),
    "unit_lr 1e-2": dict(unit_lr=1e-2),
    "mine_k 1 (the paper's rule)": dict(mine_k=1),
    "mine_k 40": dict(mine_k=40),
    "mine_k 70": dict(mine_k=70),
    "mine_k 140 (all positive pairs)": dict(mine_k=140),
    "beta 0.2": dict(beta=0.2),
    "unit_lr 1e-2, mine_k 140": dict(unit_lr=1e-2, mine_k=140),
    # dataset-independent: k larger than any batch's positive pairs keeps them all
    "mine_k all": dict(mine_k=10**6),
    "mine_k all, unit_lr 1e-2": dict(mine_k=10**6, unit_lr=1e-2),
    "mine_k all, unit_lr 3e-3": dict(mine_k=10**6, unit_lr=3e-3),
}


def joint_q(unit, a, b):
    """q = relu(W_c [normalize(u'); normalize(v')] + b_c) of docs/design.md "The PDDM unit" for row-aligned pairs."""
    u1 = torch.relu(F.normalize((a - b).abs(), dim=1) @ unit.W_u.T + unit.b_u)
    v1 = torch.relu(F.normalize((a + b) / 2, dim=1) @ unit.W_v.T + unit.b_v)
    z = torch.cat([F.normalize(u1, dim=1), F.normalize(v1, dim=1)], 1)
    return torch.relu(z @ unit.W_c.T + unit.b_c)


def auc(pos, neg):
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


@torch.no_grad()
def batch_probe(unit, f, labels):
    m = len(labels)
    i, j = torch.triu_indices(m, m, 1)
    same = labels[i] == labels[j]
    S = unit.pair_scores(f[i], f[j])
    q = joint_q(unit, f[i], f[j])
    d = -((f[i] - f[j]) ** 2).sum(1)
    return dict(q_on=float((q > 0).float().mean()), units_on=int((q > 0).any(0).sum()), c=q.shape[1],
                S_std=float(S.std()), auc_S=auc(S[same], S[~same]), auc_d=auc(d[same], d[~same]),
                tail=float(S[~same].max() - S[same].min()), w_s=float(unit.w_s.norm()))


def run(name, overrides, split, steps, every, dataset="mnist5k", k=8):
    cfg = dataclasses.replace(TrainConfig(dataset=dataset, loss="pddm", epochs=1, batches_per_epoch=steps,
                                          seed=0, threads=1, k=k), **overrides)
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    p = min(8, split.num_train_classes)
    model, _ = build_model(split.image_shape, cfg.embedding_dim, backbone=cfg.backbone)
    loss_fn = build_loss(cfg, p)
    optimizer = build_optimizer(cfg, model, loss_fn)
    sampler = PKSampler(split.train_labels, p, cfg.k, num_batches=steps, seed=cfg.seed)
    unit = loss_fn.unit
    print(f"\n== {name}  ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'compare defaults'})")
    print(f"{'step':>4} {'q_on':>5} {'units':>6} {'|g| unit':>9} {'S std':>7} {'AUC S':>6} {'AUC d':>6} "
          f"{'tail':>7} {'|w_s|':>6} {'E_m':>6} {'E_e':>6}")
    t0 = time.perf_counter()
    gsum, gn = 0.0, 0
    for step, b in enumerate(sampler, 1):
        x, y = split.train.images[b], split.train.labels[b]
        model.train()
        emb = model(x)
        loss = loss_fn(emb, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        g = torch.sqrt(sum((prm.grad ** 2).sum() for prm in unit.parameters() if prm.grad is not None))
        gsum, gn = gsum + float(g), gn + 1
        optimizer.step()
        if step == 1 or step % every == 0:
            pr = batch_probe(unit, F.normalize(emb.detach(), dim=1), y)
            print(f"{step:>4} {pr['q_on']:>5.2f} {pr['units_on']:>3}/{pr['c']:<2} {gsum / gn:>9.2e} {pr['S_std']:>7.4f} "
                  f"{pr['auc_S']:>6.3f} {pr['auc_d']:>6.3f} {pr['tail']:>7.4f} {pr['w_s']:>6.3f} "
                  f"{float(loss_fn.last_metric_loss):>6.3f} {float(loss_fn.last_embedding_loss):>6.3f}")
            gsum, gn = 0.0, 0
    print(f"({time.perf_counter() - t0:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--configs", nargs="*", default=None, help="substrings of the config names to run (default all)")
    ap.add_argument("--dataset", default="mnist5k", help="mnist5k (compare: -K 8) or glyphs (compare: -K 4)")
    ap.add_argument("-K", type=int, default=8, help="images per class in a batch (P = min(8, classes))")
    args = ap.parse_args()
    split = data_mod.load_dataset(args.dataset)
    for name, overrides in CONFIGS.items():
        if args.configs and name not in args.configs and not any(name.startswith(c) for c in args.configs):
            continue
        run(name, overrides, split, args.steps, args.every, args.dataset, args.K)


if __name__ == "__main__":
    main()
