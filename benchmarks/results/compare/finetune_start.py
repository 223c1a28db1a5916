"""Where the fine-tuning regime's first 100 steps lose Recall@1: the network as `pddm-ext compare` builds
it for seed 0 of `finetune_icons` (EfficientNet-Lite0 with its ImageNet weights, a random 64-d linear
layer, icons at 64 px), evaluated on the unseen classes before any training step, then after 100
training-mode forward passes over the run's own P x K batches with no optimiser step (the batch-norm
running statistics move, momentum 0.01, no weight does), with and without the run's augmentation.
Each state is evaluated twice: the embedding (head on the features, L2-normalised: what the runs
report) and the pooled 1280-d features alone (L2-normalised: the floor's measure).

Run from the checkout: OMP_NUM_THREADS=1 python benchmarks/results/compare/finetune_start.py
(output of the committed run: finetune_start.txt beside this file)."""

import copy
import tempfile

import torch
import torch.nn.functional as F

from pddm_ext.app import evaluate as ev
from pddm_ext.app.augment import random_affine
from pddm_ext.app.backbones import lite_input
from pddm_ext.app.config import TrainConfig
from pddm_ext.app.train import Run

STEPS = 100


@torch.no_grad()
def recall_at_1(model, split, features_only):
    model.eval()
    if features_only:
        norm = split.info.get("input_norm")
        feats = [F.normalize(model.trunk.features(lite_input(x, norm, model.min_size)), dim=1)
                 for x in split.test.images.split(256)]
        emb, labels = torch.cat(feats), split.test.labels
    else:
        emb, labels = ev.embed(model, split.test)
    return ev.retrieval_metrics(emb, labels, seed=0)["recall@1"]


def report(name, model, split):
    print(f"{name:58s} embedding R@1 {recall_at_1(model, split, False):.3f}   "
          f"features R@1 {recall_at_1(model, split, True):.3f}", flush=True)


@torch.no_grad()
def move_batch_norm(trainer, model, augment):
    model.train()
    for step, (x, _) in enumerate(trainer.batches()):
        if step == STEPS:
            break
        model(random_affine(x) if augment else x)


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(dataset="icons", backbone="efficientnet-lite0", pretrained=True, image_size=64, p=8, k=4,
                          epochs=10, batches_per_epoch=STEPS, threads=1, lr=1e-4, unit_lr=1e-3, seed=0, out=out)
        trainer = Run(cfg, progress=False)
    split, start = trainer.split, trainer.model
    print(f"icons 64 px, seed 0: {len(split.train)} training images, {len(split.test)} test images; "
          f"raw pixels R@1 {trainer.floor['recall@1']:.3f}")
    report("before any step (what seed 0 starts from)", start, split)
    for augment in (True, False):
        model = copy.deepcopy(start)
        torch.manual_seed(0)
        move_batch_norm(trainer, model, augment)
        report(f"after {STEPS} forward passes, no step ({'augmented' if augment else 'not augmented'})",
               model, split)


if __name__ == "__main__":
    main()
