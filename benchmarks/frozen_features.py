"""The frozen-backbone regime: EfficientNet-Lite0's ImageNet features computed once, an embedding head
trained on top with each loss, compared by `pddm-ext compare`'s machinery (same batches per seed,
paired tests, convergence plot, resumable runs).

    OMP_NUM_THREADS=1 python -m benchmarks.frozen_features --dataset icons \\
        --out benchmarks/results/compare/frozen_icons

What it does:

1. loads the dataset (``icons`` rendered at ``--size`` px; ``glyphs`` at 32 px, upsampled to ``--size``
   by the backbone's input rule, ``pddm_ext.app.backbones.lite_input``: grey replicated to RGB, bilinear);
2. computes the 1280-d pooled features of EfficientNet-Lite0 with its ImageNet weights (the
   ``pretrained`` extra), eval mode, once; cached in ``$XDG_CACHE_HOME/pddm-ext/features/`` (default
   ``~/.cache``) under a hash of the dataset (its icon or font hash) and the size;
3. replaces the network of ``pddm-ext train`` by a linear layer 1280 -> ``--embedding-dim``,
   L2-normalised (the only trained weights besides the loss's unit), and the dataset by the features
   (no augmentation: they are fixed vectors);
4. runs ``pddm_ext.app.compare.run_all`` for ``--losses`` x ``--seeds``: results.md / results.json /
   convergence.png in ``--out``, one folder per run under ``<out>/runs`` (an interrupted command
   resumes where it stopped; commit results.md, results.json, convergence.png and steps_to_target.md,
   not the runs). The floor row of the table and the plot (``compare``'s "raw pixels") is here the
   metrics of the L2-normalised pretrained features themselves, named "pretrained features (floor)":
   what the head must beat;
5. writes ``<out>/steps_to_target.md`` (``benchmarks/steps_to_target.py``): per entry and seed, the
   training steps after which Recall@1 on the test classes first reached ``--target`` (evaluated once
   per epoch).

One thread (torch.set_num_threads(1)): the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pddm_ext.app import compare, config
from pddm_ext.app import datasets as data_mod
from pddm_ext.app import evaluate as ev
from pddm_ext.app import backbones, models
from pddm_ext.app import train as train_mod

from benchmarks import steps_to_target


class LinearHead(nn.Module):
    """(N, 1280, 1, 1) frozen features -> (N, dim) L2-normalised embeddings."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)

    def forward(self, x):
        return F.normalize(self.embed(x.flatten(1)), dim=1)


def _dataset_key(split, size):
    info = split.info
    ident = info.get("icon_hash") or info.get("font_hash") or json.dumps(info, sort_keys=True, default=str)
    return hashlib.sha256(f"{info['name']} {ident} {size} efficientnet-lite0".encode()).hexdigest()


@torch.no_grad()
def features(split, size, batch_size=128):
    """(train features, test features), each (n, 1280) float32, computed once and cached."""
    key = _dataset_key(split, size)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache_path = os.path.join(base, "pddm-ext", "features", f"{key[:32]}.pt")
    if os.path.exists(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        if cached.get("key") == key:
            return cached["train"], cached["test"]
    net = models.load_efficientnet_lite0()
    norm = split.info.get("input_norm")
    out = []
    for ds in (split.train, split.test):
        x = ds.images
        feats = [net.features(backbones.lite_input(x[i:i + batch_size], norm, min_size=size))
                 for i in range(0, len(x), batch_size)]
        out.append(torch.cat(feats))
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    torch.save(dict(key=key, train=out[0], test=out[1]), cache_path)
    return out[0], out[1]


def feature_split(split, size):
    f_train, f_test = features(split, size)
    info = dict(split.info, features=f"efficientnet-lite0 ImageNet weights, eval mode, 1280-d pooled, {size} px input")
    return data_mod.ZeroShotSplit(data_mod.TensorImages(f_train[:, :, None, None], split.train_labels),
                                  data_mod.TensorImages(f_test[:, :, None, None], split.test_labels),
                                  split.train_labels, split.test_labels, (f_train.shape[1], 1, 1), info)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="icons, icons:PATH (a folder of icon themes) or glyphs")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=96, help="input side of the backbone in px (default 96)")
    p.add_argument("--losses", nargs="+", default=["pddm", "pddm-euclidean", "batch-hard"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batches-per-epoch", type=int, default=50)
    p.add_argument("-K", dest="k", type=int, default=4, help="images per class in a batch (default 4)")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--target", type=float, default=None,
                   help="Recall@1 for steps_to_target.md (default: the features' own Recall@1, the floor)")
    p.add_argument("--floor-only", action="store_true",
                   help="only the floor: write <out>/floor.json, the metrics of the pretrained features on the "
                        "test classes at --size (the fine-tuning regime's floor), and train nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    if not (args.dataset in ("icons", "glyphs") or args.dataset.startswith("icons:")):
        p.error(f"--dataset must be icons, icons:PATH or glyphs, got {args.dataset!r}")
    image_size = args.size if args.dataset.startswith("icons") else None
    split = data_mod.load_dataset(args.dataset, image_size=image_size)
    fsplit = feature_split(split, args.size)
    if args.floor_only:
        floor = ev.pixel_floor(fsplit.test, seed=0)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "floor.json"), "w") as f:
            json.dump(dict(dataset=args.dataset, size=args.size, features=fsplit.info["features"], floor=floor), f, indent=1)
        print(json.dumps(floor))
        return 0

    def prepare(cfg):
        config.check_config(cfg)
        config.check_against_data(cfg, fsplit)
        return fsplit

    def build_model(image_shape, embedding_dim=64, **_):
        return LinearHead(image_shape[0], embedding_dim), "linear head on frozen efficientnet-lite0 ImageNet features"

    # compare's data and network replaced for this command only (restored after, also on errors)
    saved = compare.prepare, train_mod.build_model
    compare.prepare, train_mod.build_model = prepare, build_model
    try:
        base = config.TrainConfig(dataset=args.dataset, epochs=args.epochs, batches_per_epoch=args.batches_per_epoch,
                                  k=args.k, embedding_dim=args.embedding_dim, augment=False, threads=1)
        summary = compare.run_all(base, losses=args.losses, seeds=args.seeds, out=args.out, progress=False,
                                  floor_label="pretrained features (floor)")
    finally:
        compare.prepare, train_mod.build_model = saved
    # the floor row here is the pretrained features: named "floor", as `python -m benchmarks.steps_to_target` does
    targets = [(args.target, "target")] if args.target is not None else [(summary["floor"]["recall@1"], "floor")]
    text = steps_to_target.table(steps_to_target.runs_of(summary), targets, args.batches_per_epoch)
    with open(os.path.join(args.out, "steps_to_target.md"), "w") as f:
        f.write(text)
    print((Path(args.out) / "results.md").read_text())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
