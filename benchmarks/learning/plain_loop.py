"""The plain loop: does the PDDM unit learn a metric that transfers to unseen classes?

An MLP (64 -> 128 -> 32) on scikit-learn's digits (8 x 8 images), trained on classes 0-4 with
P = 5 x K = 8 batches, Adam 1e-3, 300 steps; measured on every pair of the unseen classes 5-9:

- ``spread``: std of the unit's scores S over those pairs;
- ``auc_S``: ROC AUC of S for telling same-class from different-class pairs
  (``sklearn.metrics.roc_auc_score``);
- ``auc_euc``: the same AUC for -||a - b||^2 of the same (L2-normalised) embeddings.

The target (with ``PDDMLoss``'s defaults): spread >= 0.05 and auc_S >= 0.70, mean of 3 seeds.

Two ways to run a configuration:

- ``--package``: ``pddm_ext.PDDMLoss(32, **options)`` itself (``--options '{"k": 1}'``; ``{}`` =
  the package's defaults). This is the committed measurement of the target.
- otherwise a *scratch* loss written out below in plain PyTorch (all pairs of the 40-row batch,
  ordinary autograd), used to explore variants before they existed in the package: which positive
  pairs enter E_m (``--pairs hardest1 | all``), hardest or semi-hard negatives (``--negatives``),
  a balanced BCE pair-classification term on S (``--bce``), a warm-up that mines by Euclidean
  distance until the unit separates held-out training-class pairs as well as Euclidean distance
  does (``--warmup``), and the unit form (``--distance-aware``: u, v fed to W_u, W_v unnormalised,
  docs/design.md, "The two forms").

Usage (each prints one line per seed and the mean; ``--json`` appends results to a file):

    python benchmarks/learning/plain_loop.py --package --options '{}'
    python benchmarks/learning/plain_loop.py --pairs hardest1                 # the paper's rule
    python benchmarks/learning/plain_loop.py --pairs all --distance-aware --bce 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pddm_ext
from pk import pk_batches  # the scripts' folder is on sys.path when run as a script

D = 32  # embedding dimension


def load_digits():
    """(x_train, y_train, x_heldout, y_heldout, x_unseen, y_unseen): classes 0-4 split 80/20
    (fixed split), classes 5-9 unseen. Pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(1234)
    seen = torch.nonzero(y < 5).flatten()
    seen = seen[torch.randperm(len(seen), generator=g)]
    n_hold = len(seen) // 5
    hold, train = seen[:n_hold], seen[n_hold:]
    unseen = torch.nonzero(y >= 5).flatten()
    return x[train], y[train], x[hold], y[hold], x[unseen], y[unseen]


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, D))


# ---------------------------------------------------------------------------------------------
# The unit's score in plain PyTorch, in both forms (docs/design.md, "The two forms"): only the normalisation of u, v differs.

def unit_pair_scores(a, b, unit, normalize_inputs):
    u = (a - b).abs()
    v = (a + b) / 2
    if normalize_inputs:
        u, v = F.normalize(u, dim=-1, eps=1e-12), F.normalize(v, dim=-1, eps=1e-12)
    u1 = torch.relu(u @ unit.W_u.T + unit.b_u)
    v1 = torch.relu(v @ unit.W_v.T + unit.b_v)
    joint = torch.cat([F.normalize(u1, dim=-1, eps=1e-12), F.normalize(v1, dim=-1, eps=1e-12)], dim=-1)
    q = torch.relu(joint @ unit.W_c.T + unit.b_c)
    return q @ unit.w_s + unit.b_s


def unit_all_scores(x, unit, normalize_inputs, block=128):
    """(m, m) scores of the rows of x (row blocks, so memory stays O(block * m * d))."""
    m = x.shape[0]
    rows = []
    for s in range(0, m, block):
        a = x[s:s + block, None, :].expand(-1, m, -1)
        b = x[None, :, :].expand(a.shape[0], m, -1)
        rows.append(unit_pair_scores(a.reshape(-1, x.shape[1]), b.reshape(-1, x.shape[1]), unit,
                                     normalize_inputs).reshape(a.shape[0], m))
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# The scratch loss.

def scratch_loss(f, labels, unit, cfg, mine_euclidean):
    """E_m (double-header hinge) + lam E_e on mined quadruplets, + bce * balanced BCE on S."""
    m = f.shape[0]
    S = unit_all_scores(f, unit, not cfg.distance_aware)  # with autograd (m = 40: 1,600 pairs)
    d2 = torch.cdist(f, f) ** 2
    M = (-d2 if mine_euclidean else S).detach()  # the mining score: high = similar
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(m, dtype=torch.bool)
    pos = same & ~eye
    neg = ~same
    i, j = torch.nonzero(pos.triu(1), as_tuple=True)
    if cfg.pairs == "hardest1":
        order = torch.argsort(M[i, j], stable=True)[:1]
        i, j = i[order], j[order]
    elif cfg.pairs.startswith("hardest"):  # hardestN
        order = torch.argsort(M[i, j], stable=True)[: int(cfg.pairs[7:])]
        i, j = i[order], j[order]

    def pick_negative(rows, bound):
        cand = M[rows].masked_fill(~neg[rows], -float("inf"))
        if cfg.negatives == "hardest":
            return cand.argmax(1)
        # semi-hard: the most similar negative still less similar than the positive pair;
        # none: the least similar negative (the convention of TensorFlow's triplet_semihard_loss)
        semi = cand.masked_fill(cand >= bound[:, None], -float("inf"))
        easiest = M[rows].masked_fill(~neg[rows], float("inf")).argmin(1)
        return torch.where(torch.isfinite(semi.max(1).values), semi.argmax(1), easiest)

    k = pick_negative(i, M[i, j])
    l_ = pick_negative(j, M[i, j])
    E_m = torch.relu(cfg.alpha + S[i, k] - S[i, j]) + torch.relu(cfg.alpha + S[j, l_] - S[i, j])
    E_e = torch.relu(cfg.beta + d2[i, j] - d2[i, k]) + torch.relu(cfg.beta + d2[i, j] - d2[j, l_])
    loss = E_m.mean() + cfg.lam * E_e.mean()
    if cfg.bce:
        pi, pj = torch.nonzero(pos.triu(1), as_tuple=True)
        ni, nj = torch.nonzero(neg.triu(1), as_tuple=True)
        bce = 0.5 * (F.binary_cross_entropy_with_logits(S[pi, pj], torch.ones(len(pi)))
                     + F.binary_cross_entropy_with_logits(S[ni, nj], torch.zeros(len(ni))))
        loss = loss + cfg.bce * bce
    return loss, float(E_m.detach().mean())


# ---------------------------------------------------------------------------------------------
# Metrics.

@torch.no_grad()
def pair_metrics(f, labels, score_matrix):
    """spread (std of S), AUC of S and AUC of -||a - b||^2 over all pairs i < j of f."""
    from sklearn.metrics import roc_auc_score

    i, j = torch.triu_indices(len(f), len(f), 1)
    same = (labels[i] == labels[j]).numpy()
    s = score_matrix[i, j]
    d2 = ((f[i] - f[j]) ** 2).sum(1)
    return {"spread": float(s.std()), "auc_S": float(roc_auc_score(same, s.numpy())),
            "auc_euc": float(roc_auc_score(same, (-d2).numpy()))}


@torch.no_grad()
def unit_scores_for(f, unit, normalize_inputs):
    """All-pairs S with the package's fused op when it covers the form, else the plain formula."""
    try:
        return unit(f) if getattr(unit, "normalize_inputs", True) == normalize_inputs else \
            unit_all_scores(f, unit, normalize_inputs)
    except TypeError:
        return unit_all_scores(f, unit, normalize_inputs)


def run(cfg, seed, data):
    x_tr, y_tr, x_ho, y_ho, x_un, y_un = data
    torch.manual_seed(seed)
    model = make_model()
    if cfg.package:
        loss_fn = pddm_ext.PDDMLoss(D, **cfg.options)
        unit = loss_fn.unit
        normalize_inputs = getattr(unit, "normalize_inputs", True)
    else:
        unit = pddm_ext.PDDM(D)
        normalize_inputs = not cfg.distance_aware
    opt = torch.optim.Adam(list(model.parameters()) + list(unit.parameters()), lr=1e-3)
    batches = pk_batches(y_tr, 5, 8, torch.Generator().manual_seed(seed))
    warm = cfg.warmup and not cfg.package
    warm_end = None
    for step in range(cfg.steps):
        idx = next(batches)
        emb = model(x_tr[idx])
        if cfg.package:
            loss = loss_fn(emb, y_tr[idx])
        else:
            f = F.normalize(emb, dim=1)
            loss, _ = scratch_loss(f, y_tr[idx], unit, cfg, mine_euclidean=warm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if warm and (step + 1) % cfg.warmup_every == 0:
            with torch.no_grad():
                fh = F.normalize(model(x_ho), dim=1)
                mh = pair_metrics(fh, y_ho, unit_all_scores(fh, unit, normalize_inputs))
            if mh["auc_S"] >= mh["auc_euc"]:
                warm, warm_end = False, step + 1
    with torch.no_grad():
        fu = F.normalize(model(x_un), dim=1)
        out = pair_metrics(fu, y_un, unit_scores_for(fu, unit, normalize_inputs))
        out["recall@1"] = pddm_ext.app.evaluate.recall_at_k(fu, y_un, (1,))[1]
    out["warmup_end"] = warm_end
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", action="store_true", help="train with pddm_ext.PDDMLoss(32, **options)")
    ap.add_argument("--options", type=json.loads, default={}, help="PDDMLoss keyword options, JSON")
    ap.add_argument("--pairs", default="hardest1", help="positive pairs in E_m: hardest1, hardestN or all")
    ap.add_argument("--negatives", default="hardest", choices=["hardest", "semihard"])
    ap.add_argument("--bce", type=float, default=0.0, help="weight of the balanced BCE term on S")
    ap.add_argument("--warmup", action="store_true", help="mine by Euclidean distance until the unit catches up")
    ap.add_argument("--warmup-every", type=int, default=25, help="steps between warm-up checks")
    ap.add_argument("--distance-aware", action="store_true", help="unit fed unnormalised u, v")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label", default=None, help="name of this configuration in the output")
    ap.add_argument("--json", default=None, help="append {label, config, per-seed, mean} to this JSON-lines file")
    cfg = ap.parse_args(argv)
    torch.set_num_threads(1)
    import pddm_ext.app.evaluate  # noqa: F401

    data = load_digits()
    label = cfg.label or (f"package {json.dumps(cfg.options)}" if cfg.package else
                          f"pairs={cfg.pairs} neg={cfg.negatives} bce={cfg.bce} warmup={cfg.warmup} "
                          f"distance_aware={cfg.distance_aware} alpha={cfg.alpha} lam={cfg.lam}")
    rows = []
    t0 = time.time()
    for seed in cfg.seeds:
        r = run(cfg, seed, data)
        rows.append(r)
        print(f"  seed {seed}: spread {r['spread']:.4f}  auc_S {r['auc_S']:.3f}  auc_euc {r['auc_euc']:.3f}  "
              f"R@1 {r['recall@1']:.3f}  warmup_end {r['warmup_end']}", flush=True)
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("spread", "auc_S", "auc_euc", "recall@1")}
    ok = mean["spread"] >= 0.05 and mean["auc_S"] >= 0.70
    print(f"{label}: mean spread {mean['spread']:.4f}  auc_S {mean['auc_S']:.3f}  auc_euc {mean['auc_euc']:.3f}  "
          f"R@1 {mean['recall@1']:.3f}  target {'MET' if ok else 'not met'}  ({time.time() - t0:.0f} s)", flush=True)
    if cfg.json:
        config = {k: v for k, v in vars(cfg).items() if k not in ("json", "label")}
        with open(cfg.json, "a") as fh:
            fh.write(json.dumps({"label": label, "config": config, "seeds": rows, "mean": mean,
                                 "target_met": ok}) + "\n")
    return mean


if __name__ == "__main__":
    main()
