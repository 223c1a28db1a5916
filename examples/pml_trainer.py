"""A pytorch-metric-learning training loop on sklearn's digits, with PDDM hard mining added.

This is the usual PML loop (model, TripletMarginLoss, a miner, MPerClassSampler). The five lines
marked ``# [pddm]`` are the whole change: a PDDMLoss that learns the metric, a PDDMMiner that mines
with it (it replaces PML's TripletMarginMiner), the optimiser that trains both, and the loss term.

    python examples/pml_trainer.py [--epochs 5]

Needs pytorch-metric-learning and scikit-learn: from a checkout, ``pip install '.[pml]' scikit-learn``. Prints the loss per epoch and the test
precision@1 (nearest neighbour among the training embeddings).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, samplers
from sklearn.datasets import load_digits

import pddm_ext  # [pddm]
from pddm_ext.app import options

EMBEDDING_DIM = 32


def digits(seed):
    """Digits as (train_x, train_y, test_x, test_y): 8x8 images flattened, scaled to [0, 1], 75/25."""
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def precision_at_1(model, train_x, train_y, test_x, test_y):
    model.eval()
    with torch.no_grad():
        ref, query = F.normalize(model(train_x), dim=1), F.normalize(model(test_x), dim=1)
    model.train()
    nearest = torch.cdist(query, ref).argmin(1)
    return (train_y[nearest] == test_y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the value rules of pddm-ext train (epochs >= 1, seeds numpy accepts): --epochs 0 trained nothing and exited 0
    parser.add_argument("--epochs", type=options.NUMBERS["epochs"], default=5)
    parser.add_argument("--seed", type=options.SEED, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = digits(args.seed)
    sampler = samplers.MPerClassSampler(train_y, m=8, batch_size=64, length_before_new_iter=len(train_y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=64,
                                         sampler=sampler, drop_last=True)

    # ---- the existing PML training loop ----------------------------------------------------------
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, EMBEDDING_DIM))
    loss_func = losses.TripletMarginLoss(margin=0.2)
    pddm_loss = pddm_ext.PDDMLoss(EMBEDDING_DIM, k=8)  # [pddm] learns the PDDM metric
    miner = pddm_ext.PDDMMiner(unit=pddm_loss.unit, k=32)  # [pddm] was miners.TripletMarginMiner(...)
    optimizer = torch.optim.Adam([*model.parameters(), *pddm_loss.parameters()], lr=1e-3)  # [pddm]

    print(f"test precision@1 before training {precision_at_1(model, train_x, train_y, test_x, test_y):.3f}")
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for data, labels in loader:
            optimizer.zero_grad()
            embeddings = model(data)
            indices_tuple = miner(embeddings, labels)
            loss = loss_func(embeddings, labels, indices_tuple) + pddm_loss(embeddings, labels)  # [pddm]
            loss.backward()
            optimizer.step()
            total += loss.item()
        p1 = precision_at_1(model, train_x, train_y, test_x, test_y)
        print(f"epoch {epoch}: loss {total / len(loader):.4f}, test precision@1 {p1:.3f}")


if __name__ == "__main__":
    main()
