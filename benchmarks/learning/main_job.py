"""Issue 13 item 5: which training recipe makes a learned embedding beat raw pixels on unseen classes?

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
import math
import time

import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext.app import datasets as data_mod
from pddm_ext.app import evaluate as ev
from pddm_ext.app.models import build_model


def random_affine(x, generator, *, degrees=10.0, translate=0.1, scale=(0.9, 1.1), shear=10.0):
    """Per-image random affine transform of a batch (n, c, h, w) (rotation, shift as a fraction of the
    size, scale, shear), bilinear, zero padding: torchvision's RandomAffine, drawn per image."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    rot = u(-degrees, degrees) * math.pi / 180
    sh = u(-shear, shear) * math.pi / 180
    s = u(*scale)
    tx, ty = u(-translate, translate) * 2, u(-translate, translate) * 2  # grid units span [-1, 1]
    cos, sin = torch.cos(rot), torch.sin(rot)
    # rotation-and-shear matrix scaled by 1/s (affine_grid maps output to input coordinates)
    a11, a12 = cos / s, (-sin + cos * torch.tan(sh)) / s
    a21, a22 = sin / s, (cos + sin * torch.tan(sh)) / s
    theta = torch.stack([torch.stack([a11, a12, tx], 1), torch.stack([a21, a22, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pk_batches(labels, p, k, generator):
    classes = labels.unique()
    by_class = [torch.nonzero(labels == c).flatten() for c in classes]
    while True:
        batch = []
        for c in torch.randperm(len(classes), generator=generator)[:p].tolist():
            items = by_class[c]
            if len(items) >= k:
                batch.append(items[torch.randperm(len(items), generator=generator)[:k]])
            else:
                batch.append(items[torch.randint(len(items), (k,), generator=generator)])
        yield torch.cat(batch)


def emulate_distance_aware():
    """Until the fused kernels take ``normalize_inputs`` (branch ``kernel``): PDDMLoss scores and mines
    with the plain PyTorch reference, its u and v fed to W_u and W_v unnormalised (SPEC §1 "Two
    forms"). Slower (the reference materialises all pairs), same values up to rounding."""
    from pddm_ext import modules, reference

    def pair_scores(a, b, params):
        W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = params
        u1 = torch.relu((a - b).abs() @ W_u.T + b_u)
        v1 = torch.relu((a + b) / 2 @ W_v.T + b_v)
        q = torch.relu(torch.cat([F.normalize(u1, dim=-1), F.normalize(v1, dim=-1)], -1) @ W_c.T + b_c)
        return q @ w_s + b_s

    reference.pair_scores = pair_scores
    modules._pair_scores = pair_scores
    modules.pddm_scores = lambda x, y, *params: reference.pddm_scores(x, y, params)
    modules.mine_hard = reference.mine_hard


def build_loss(cfg, dim):
    if cfg.loss == "pddm":
        options = dict(cfg.options)
        if options.get("normalize_inputs") is False and "normalize_inputs" not in \
                pddm_ext.PDDMLoss.__init__.__code__.co_varnames:
            emulate_distance_aware()
            del options["normalize_inputs"]
        return pddm_ext.PDDMLoss(dim, **options)
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
            x = random_affine(x, g)
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
                extra = f"  E_m {float(loss_fn.last_metric_loss):.3f}"
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
