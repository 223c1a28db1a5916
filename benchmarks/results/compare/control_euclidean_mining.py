"""Control for mnist5k_tuned: is the gain of `--loss pddm --mine-k 140` over batch-hard due to PDDM
*mining*, or to training on all 140 positive pairs of a batch (280 triplets instead of 40)?

Same loop, data, seeds, network, optimiser and PDDMLoss (alpha 0.5, beta 1, lam 0.5; the unit is
still trained by the double-header hinge and the embedding still learns through S and the embedding
loss), but the quadruplets are mined with the Euclidean metric (docs/design.md "Ties and tolerance" ``metric="euclidean"``, k=140)
and handed to the loss as ``indices_tuple`` (which gives exactly the quadruplet loss, docs/design.md "Loss").

Usage (repo root): .venv/bin/python benchmarks/results/compare/control_euclidean_mining.py [--seeds 0 1 2 3 4] [--metric pddm]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from pddm_ext.app import datasets as data_mod
from pddm_ext.app import evaluate as ev
from pddm_ext import mine_hard
from pddm_ext.app.models import build_model
from pddm_ext import PDDMLoss, PKSampler
from pddm_ext.app.checkpoint import seed_everything


def run(split, seed, *, epochs=5, batches=50, k=8, mine_k=140, metric="euclidean"):
    torch.set_num_threads(1)
    seed_everything(seed)
    p = min(8, split.num_train_classes)
    model, _ = build_model(split.image_shape, 64, backbone="auto")
    loss_fn = PDDMLoss(64, alpha=0.5, beta=1.0, lam=0.5, k=mine_k)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3)
    sampler = PKSampler(split.train_labels, p, k, num_batches=batches, seed=seed)
    history = []
    for epoch in range(epochs):
        model.train()
        m_loss = []
        for b in sampler:
            x, y = split.train.images[b], split.train.labels[b]
            emb = model(x)
            f = F.normalize(emb.detach(), dim=1)
            unit = loss_fn.unit if metric == "pddm" else None
            quads = mine_hard(f, y, unit, k=mine_k, metric=metric)
            loss = loss_fn(emb, y, indices_tuple=quads.as_triplets())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            m_loss.append(float(loss_fn.last_metric_loss))
        e, labels = ev.embed(model, split.test, device="cpu")
        metrics = ev.retrieval_metrics(e, labels, seed=seed)
        history.append(dict(epoch=epoch + 1, metric_loss=float(np.mean(m_loss)), **metrics))
        print(f"seed {seed} epoch {epoch + 1}: R@1 {metrics['recall@1']:.3f} NMI {metrics['nmi']:.3f} "
              f"metric loss {np.mean(m_loss):.3f}", flush=True)
    return history


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--metric", default="euclidean", choices=["euclidean", "pddm"],
                    help="pddm: the same loop with PDDM mining, a check that it reproduces `--loss pddm --mine-k 140`")
    ap.add_argument("--out", default=None, help="write the histories as JSON here")
    args = ap.parse_args()
    split = data_mod.load_dataset("mnist5k")
    runs = {s: run(split, s, metric=args.metric) for s in args.seeds}
    for key in ("recall@1", "nmi"):
        v = [h[-1][key] for h in runs.values()]
        print(f"final {key}: {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} over seeds {args.seeds}")
    r1 = np.mean([[h["recall@1"] for h in hist] for hist in runs.values()], 0)
    print("Recall@1 per epoch (mean):", " ".join(f"{v:.3f}" for v in r1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({str(s): h for s, h in runs.items()}, fh, indent=1)


if __name__ == "__main__":
    main()
