"""The training loop end to end on scikit-learn's 8x8 digits: learning, exact resume, bad configs."""

import dataclasses
import io
import json
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from pddm_ext.app import datasets as data  # noqa: E402
from pddm_ext.app.cli import main  # noqa: E402
from pddm_ext.app.config import ConfigError, TrainConfig  # noqa: E402
from pddm_ext.app.losses import LOSSES  # noqa: E402
from pddm_ext.app.train import train  # noqa: E402

TIMING = ("epoch_time", "train_time")


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_two_epochs_on_digits_learn(digits, tmp_path):
    cfg = TrainConfig(dataset="digits", epochs=2, seed=0, threads=1, out=str(tmp_path / "run"))
    result = train(cfg, progress=False, split=digits)
    first, last = result["history"]
    assert last["loss"] < first["loss"]
    # 5 test classes of ~180 images: chance Recall@1 is about 0.2
    assert last["recall@1"] > 0.6
    assert last["recall@8"] >= last["recall@4"] >= last["recall@2"] >= last["recall@1"]
    assert 0.0 < last["nmi"] <= 1.0
    assert 0.0 < last["r_precision"] <= 1.0 and 0.0 < last["map@r"] <= last["r_precision"]  # MAP@R <= R-Precision
    assert {"map@r", "r_precision"} <= set(result["floor"])
    assert first["mining"]["tuples"] > 0 and "s_pos" in first["mining"]
    out = tmp_path / "run"
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "recall_at_1.png").stat().st_size > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "loss", "optimizer", "epoch", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and any(k.startswith("unit.") for k in ckpt["loss"])  # the PDDM unit is saved
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes leave no temporary file


@pytest.mark.parametrize("loss", LOSSES)
def test_resume_continues_exactly(loss, digits, tmp_path):
    # constant lr: a one-cycle schedule depends on the epoch budget, which this resume changes (1 -> 3)
    base = TrainConfig(dataset="digits", loss=loss, epochs=3, batches_per_epoch=4, seed=3, threads=1, schedule="constant")
    straight = train(dataclasses.replace(base, out=str(tmp_path / "straight")), progress=False, split=digits)
    interrupted = dataclasses.replace(base, epochs=1, out=str(tmp_path / "resumed"))
    train(interrupted, progress=False, split=digits)
    resumed = train(dataclasses.replace(base, out=str(tmp_path / "resumed")), resume=True, progress=False, split=digits)
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["loss"]:  # tensors, and the _extra_state dicts (the unit's form, the warm-up's progress)
        same = torch.equal(a["loss"][key], b["loss"][key]) if torch.is_tensor(a["loss"][key]) else a["loss"][key] == b["loss"][key]
        assert same, key
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_seed_makes_runs_reproducible(digits, tmp_path):
    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=3, seed=5, threads=1)
    one = train(dataclasses.replace(cfg, out=str(tmp_path / "a")), progress=False, split=digits)
    two = train(dataclasses.replace(cfg, out=str(tmp_path / "b")), progress=False, split=digits)
    other = train(dataclasses.replace(cfg, seed=6, out=str(tmp_path / "c")), progress=False, split=digits)
    assert without_timing(one["history"]) == without_timing(two["history"])
    assert without_timing(one["history"]) != without_timing(other["history"])


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
    (["--dataset", "digits", "-K", "1"], "K (images per class in a batch) must be >= 2"),
    (["--dataset", "digits", "-P", "6"], "P = 6 classes per batch but dataset digits has only 5 training classes"),
    (["--dataset", "folder:/no/such/folder"], "folder '/no/such/folder' does not exist"),
    (["--dataset", "digits", "--loss", "contrastive"], "unknown loss 'contrastive'"),
    (["--dataset", "digits", "--epochs", "0"], "epochs must be >= 1"),
    (["--dataset", "digits", "--unit-lr", "0"], "unit_lr must be > 0"),
    # non-finite numbers and seeds outside numpy's range stop before training
    (["--dataset", "digits", "--alpha", "inf"], "alpha must be finite, got inf"),
    (["--dataset", "digits", "--alpha", "inf", "--loss", "batch-hard"], "alpha must be finite, got inf"),
    (["--dataset", "digits", "--beta", "nan"], "beta must be finite, got nan"),
    (["--dataset", "digits", "--lam", "inf"], "lam must be finite, got inf"),
    (["--dataset", "digits", "--lam", "-1"], "lam (the embedding-loss weight) must be >= 0, got -1.0"),
    (["--dataset", "digits", "--lr", "inf"], "lr must be > 0 and finite, got inf"),
    (["--dataset", "digits", "--unit-lr", "inf"], "unit_lr must be > 0 and finite, got inf"),
    (["--dataset", "digits", "--seed", "-5"], "seed must be in [0, 2**32 - 1], got -5"),
    (["--dataset", "digits", "--seed", str(2**32)], "seed must be in [0, 2**32 - 1], got 4294967296"),
    # --backbone auto gives 8 px grey digits the small CNN, which has no pretrained weights
    (["--dataset", "digits", "--pretrained"], "--pretrained needs the resnet18 backbone, but --backbone auto"),
])
def test_bad_config_is_a_one_line_error_before_training(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ") and message in err
    assert not out.exists()  # nothing was trained or written


def test_unit_lr_puts_the_pddm_unit_in_its_own_param_group():
    from pddm_ext.app.models import build_model
    from pddm_ext.app.losses import build_loss, build_optimizer

    model, _ = build_model((1, 8, 8), 16)
    loss_fn = build_loss(TrainConfig(dataset="digits", embedding_dim=16), 5)
    (group,) = build_optimizer(TrainConfig(dataset="digits"), model, loss_fn).param_groups  # default: one group
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(model.parameters()) + list(loss_fn.parameters()))
    net, unit = build_optimizer(TrainConfig(dataset="digits", unit_lr=1e-4), model, loss_fn).param_groups
    assert net["lr"] == 1e-3 and unit["lr"] == 1e-4
    assert [id(p) for p in unit["params"]] == [id(p) for p in loss_fn.parameters()]
    bh = build_loss(TrainConfig(dataset="digits", loss="batch-hard"), 5)  # no unit: unit_lr is moot
    assert len(build_optimizer(TrainConfig(dataset="digits", unit_lr=1e-4), model, bh).param_groups) == 1


@pytest.mark.parametrize("entry, ends", [("pddm-warmup", True), ("pddm-euclidean", False)])
def test_euclidean_mining_control_mines_every_batch_by_distance(entry, ends, digits, tmp_path, monkeypatch):
    """mining="euclidean" (compare's pddm-euclidean): the same PDDMLoss with every batch mined by Euclidean
    distance (PDDMLoss(mining="euclidean")), even once the unit ranks held-out pairs better than distance
    (which ends pddm-warmup's warm-up)."""
    from pddm_ext.app import diagnostics
    from pddm_ext.app.compare import entry_config
    from pddm_ext.app.losses import build_loss

    with pytest.raises(ConfigError, match="mining must be pddm or euclidean, got 'random'"):
        train(TrainConfig(dataset="digits", mining="random", out=str(tmp_path / "bad")), progress=False, split=digits)
    real = diagnostics.pair_diagnostics
    monkeypatch.setattr(diagnostics, "pair_diagnostics",  # the unit "beats" distance at every evaluation
                        lambda *a, **k: dict(real(*a, **k), auc_S=1.0, auc_euclidean=0.5))
    cfg = entry_config(TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, threads=1, out=str(tmp_path / "c")),
                       entry)
    assert cfg.loss == "pddm" and cfg.mining == ("pddm" if ends else "euclidean")
    assert build_loss(cfg, 4).mining == cfg.mining
    result = train(cfg, progress=False, split=digits)
    assert all(e["mining"]["tuples"] > 0 for e in result["history"])
    done = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["loss"]["_extra_state"]["warmup_done"]
    # pddm-warmup: ended after epoch 1; the control mines all 6 batches by distance (PDDMLoss(mining="euclidean"))
    # with no warm-up to count
    assert done == (100 if ends else 0)


def test_compare_reuses_runs_saved_before_an_option_existed(digits, tmp_path):
    from pddm_ext.app.compare import _finished

    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, threads=1, out=str(tmp_path / "old"))
    result = train(cfg, progress=False, split=digits)
    saved = dict(result, config={k: v for k, v in result["config"].items() if k != "unit_lr"})
    (tmp_path / "old" / "result.json").write_text(json.dumps(saved))  # as written before --unit-lr existed
    assert _finished(cfg) is not None
    assert _finished(dataclasses.replace(cfg, unit_lr=1e-4)) is None


def test_resume_refuses_changed_options_and_accepts_a_new_budget(tmp_path, capsys):
    """pddm-ext train --resume keeps the run's saved configuration: an option on the command line
    that differs from it is an error naming it (it used to be ignored); --epochs may grow."""
    out = str(tmp_path / "run")
    common = ["train", "--dataset", "digits", "--batches-per-epoch", "2", "--threads", "1", "--quiet", "--out", out]
    assert main([*common, "--epochs", "1", "--lr", "0.002"]) == 0
    capsys.readouterr()
    for changed, message in [(["--lr", "0.01"], "lr 0.01 (the run has 0.002)"),
                             (["--mine=3"], "mine_k 3 (the run has None)"),
                             (["--no-augment"], "augment False (the run has True)")]:
        assert main([*common, "--epochs", "2", "--resume", *changed]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "start a new run" in err, err
    # the saved value given again, and a longer budget, resume
    assert main([*common, "--epochs", "2", "--resume", "--lr", "0.002"]) == 0
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    # without --epochs the saved budget stands (not the option's default of 8) ...
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    # ... and a budget below the epochs already trained is an error, not a silent no-op
    capsys.readouterr()
    assert main([*common, "--epochs", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has trained 2 epochs, more than --epochs 1" in err, err


def test_compare_refuses_to_resume_a_run_of_other_options(digits, tmp_path):
    """A compare folder holding an interrupted run of other options (here 3 batches per epoch where 4 are
    asked for) is a one-line error naming them, not a silent resume of the old run."""
    from pddm_ext.app.compare import run_all

    out = tmp_path / "cmp"
    old = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, threads=1, out=str(out / "runs" / "pddm-seed0"))
    train(dataclasses.replace(old, epochs=1), progress=False, split=digits)  # "interrupted" after epoch 1 of 2
    new = dataclasses.replace(old, batches_per_epoch=4, out=None)
    with pytest.raises(ConfigError, match="batches_per_epoch 4 \\(the run has 3\\)"):
        run_all(new, ["pddm"], [0], str(out), progress=False)


def test_compare_resumes_an_interrupted_run_to_its_own_budget(digits, tmp_path):
    """An interrupted run of the same options (saved with a budget of 1 epoch) is resumed to the epochs
    compare asks for (2), not to the budget it was saved with."""
    from pddm_ext.app.compare import run_all

    out = tmp_path / "cmp"
    cfg = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, threads=1)
    train(dataclasses.replace(cfg, epochs=1, out=str(out / "runs" / "pddm-seed0")), progress=False, split=digits)
    summary = run_all(cfg, ["pddm"], [0], str(out), progress=False)
    history = [json.loads(line) for line in (out / "runs" / "pddm-seed0" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    # the budget changed on resume (1 -> 2 epochs): recorded per run and stated in results.md
    change = dict(after_epoch=1, epochs_before=1, epochs=2)
    assert summary["losses"]["pddm"]["runs"][0]["budget_changes"] == [change]
    assert json.loads((out / "runs" / "pddm-seed0" / "result.json").read_text())["budget_changes"] == [change]
    assert ("Epoch budget changed on resume; with the one-cycle schedule these are not straight runs of this budget "
            "(the cycle is re-planned at the change): pddm seed 0 (1 -> 2 epochs after epoch 1).") \
        in (out / "results.md").read_text()


def test_out_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "run")  # below a file
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "1", "--threads", "1",
                 "--quiet", "--out", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the folder" in err, err


def test_help_names_the_default_dataset(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"{TrainConfig().dataset} (default)" in capsys.readouterr().out


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(TrainConfig(dataset="digits", out=str(tmp_path / "none")), resume=True, progress=False)


def test_cli_train_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "2", "--threads", "1",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed and "MAP@R" in printed and "RP" in printed and "raw pixels" in printed
    assert (out / "checkpoint.pt").exists()


def test_compare_writes_table_plot_and_json(digits, tmp_path):
    from pddm_ext.app.compare import run_all

    base = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=2, threads=1)
    out = tmp_path / "cmp"
    summary = run_all(base, ["pddm", "batch-hard"], [0, 1], str(out), progress=False)
    assert set(summary["losses"]) == {"pddm", "batch-hard"}
    assert len(summary["losses"]["pddm"]["recall1_mean"]) == 2
    table = (out / "results.md").read_text()
    assert "| pddm |" in table and "| batch-hard |" in table and "±" in table
    assert "| MAP@R | RP |" in table and set(summary["losses"]["pddm"]["final"]) >= {"map@r", "r_precision"}
    assert json.loads((out / "results.json").read_text())["dataset"]["name"] == "digits"
    assert (out / "convergence.png").stat().st_size > 0
    # a rerun reuses the finished runs
    mtime = os.path.getmtime(out / "runs" / "pddm-seed0" / "checkpoint.pt")
    run_all(base, ["pddm", "batch-hard"], [0, 1], str(out), progress=False)
    assert os.path.getmtime(out / "runs" / "pddm-seed0" / "checkpoint.pt") == mtime


def test_compare_plots_the_pretrained_features_floor_when_out_has_one(digits, tmp_path, monkeypatch):
    """floor.json in the output folder (frozen_features --floor-only) adds its Recall@1 to the plot,
    beside the table's floor, whose label run_all takes."""
    from pddm_ext.app import compare

    drawn = []
    real = compare.plot_convergence
    monkeypatch.setattr(compare, "plot_convergence", lambda summary, path, refs: (drawn.append(refs), real(summary, path, refs)))
    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=1, threads=1)
    out = tmp_path / "cmp"
    summary = compare.run_all(base, ["batch-hard"], [0], str(out), progress=False)
    assert drawn[-1] == [(summary["floor"]["recall@1"], "raw pixels")]
    (out / "floor.json").write_text(json.dumps({"floor": {"recall@1": 0.75}}))
    compare.run_all(base, ["batch-hard"], [0], str(out), progress=False, floor_label="the floor")
    assert drawn[-1] == [(0.75, "pretrained features"), (summary["floor"]["recall@1"], "the floor")]
    assert "| the floor |" in (out / "results.md").read_text()
    assert (out / "convergence.png").stat().st_size > 0


# --- checkpoints: loaded with weights_only=True, one clear error for a bad file ---


class _RunsCodeWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): the file appears if the loader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _resume(out, capsys):
    rc = main(["train", "--dataset", "digits", "--epochs", "2", "--batches-per-epoch", "2", "--threads", "1",
               "--quiet", "--out", str(out), "--resume"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_resume_from_a_crafted_checkpoint_runs_no_code(writer, tmp_path, capsys):
    import pickle

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "marker"
    evil = {"model": _RunsCodeWhenUnpickled(marker), "epoch": 1}
    if writer == "torch.save":
        torch.save(evil, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(pickle.dumps(evil))
    rc, err = _resume(out, capsys)
    assert not marker.exists()  # nothing in the file ran
    assert rc == 2 and err.count("\n") == 1, err
    assert str(out / "checkpoint.pt") in err and "pddm-ext checkpoint" in err and "delete it" in err
    if writer == "torch.save":  # the refused global is named
        assert "holds Python objects (io.open)" in err


@pytest.fixture(scope="module")
def good_checkpoint(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train(TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, threads=1, out=str(out)), progress=False,
          split=digits)
    return (out / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a readable pddm-ext checkpoint: corrupt, truncated or of another format"),
    ("garbage", "not a readable pddm-ext checkpoint: corrupt, truncated or of another format"),
    ("empty", "not a readable pddm-ext checkpoint: corrupt, truncated or of another format"),
    ("foreign", "not a pddm-ext checkpoint (expected keys"),
    ("not a dict", "not a pddm-ext checkpoint (expected keys"),
])
def test_a_damaged_or_foreign_checkpoint_is_one_clear_error(damage, message, good_checkpoint, tmp_path, capsys):
    import io

    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(good_checkpoint[: len(good_checkpoint) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": {"w": torch.zeros(3)}} if damage == "foreign" else [torch.zeros(3)], buffer)
        path.write_bytes(buffer.getvalue())
    rc, err = _resume(out, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("pddm-ext: error: "), err
    assert str(path) in err and message in err and "start a new run" in err


def test_checkpoint_holds_only_tensors_and_plain_values(good_checkpoint, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good_checkpoint)
    ckpt = torch.load(path, weights_only=True)  # raises if anything else were inside
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python", "sampler"}


# --- logs off a terminal ---------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_summary_lines_always(digits, tmp_path, capsys, monkeypatch):
    cfg = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, threads=1)
    train(dataclasses.replace(cfg, out=str(tmp_path / "a")), progress=True, split=digits)
    err = capsys.readouterr().err  # pytest's capture: not a terminal
    assert "\r" not in err and "it/s" not in err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    assert "MAP@R" in err
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(dataclasses.replace(cfg, out=str(tmp_path / "b")), progress=True, split=digits)
    shown = terminal.getvalue()
    assert "\r" in shown and "epoch 1/2" in shown  # tqdm's bar
    assert [line for line in shown.replace("\r", "\n").splitlines() if line.startswith("epoch 2: loss")]
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    train(dataclasses.replace(cfg, out=str(tmp_path / "c")), progress=False, split=digits)  # --quiet
    assert "\r" not in quiet.getvalue() and "epoch 2: loss" in quiet.getvalue()


# --- TensorBoard ---------------------------------------------------------------


def _require(module):
    """Import ``module``; skip when it is missing, except in CI (CI=true), whose venv installs it
    (requirements-test.txt): there a missing module fails the test."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        return __import__(module)
    return pytest.importorskip(module)


def test_tensorboard_event_file_holds_the_per_epoch_metrics(digits, tmp_path):
    _require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    cfg = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=2, threads=1, out=str(tmp_path / "run"),
                      tensorboard=str(tb))
    history = train(cfg, progress=False, split=digits)["history"]
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "recall@1", "recall@8", "map@r", "r_precision", "nmi", "mining/tuples", "epoch_time"} <= tags
    for tag in ("loss", "recall@1", "map@r", "r_precision", "nmi", "mining/tuples"):
        group, _, key = tag.rpartition("/")
        want = [h[group][key] if group else h[key] for h in history]
        got = events.Scalars(tag)
        assert [e.step for e in got] == [1, 2], tag
        assert [e.value for e in got] == pytest.approx(want, rel=1e-6), tag  # stored as float32


def test_tensorboard_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--tensorboard", str(tmp_path / "tb"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard needs the tensorboard package" in err and "pip install tensorboard" in err
    assert not out.exists() and not (tmp_path / "tb").exists()


# --- torchvision backbones -------------------------------------------------------
# PyPI's torchvision needs its own torch release, and the CPU test venv's torch (2.13.0+cpu, a local
# file) has none beside it: these tests run in CI in the CUDA-build venv (`make cuda-build`: torch
# 2.14.1 with torchvision 0.29.1, on the CPU), which sets PDDM_EXT_REQUIRE_TORCHVISION=1 so that a
# missing torchvision fails there instead of skipping.


def _torchvision():
    if os.environ.get("PDDM_EXT_REQUIRE_TORCHVISION") == "1":
        import torchvision

        return torchvision
    return pytest.importorskip("torchvision", reason="torchvision matching this torch is not installed "
                                                     "(CI runs this test in the CUDA-build venv)")


def _image_folder(root, classes=4, per_class=5, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(root / f"class{c}")
        for i in range(per_class):
            pixels = rng.integers(0, 255, (36 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_resnet18_backbone_trains_one_step_on_a_generated_folder(tmp_path, capsys):
    _torchvision()
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{folder}", "--backbone", "resnet18", "--image-size", "32",
                 "--epochs", "1", "--batches-per-epoch", "1", "-P", "2", "-K", "2", "--embedding-dim", "8",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "resnet18 (random init)"
    (entry,) = result["history"]
    assert entry["epoch"] == 1 and entry["loss"] >= 0 and 0.0 <= entry["recall@1"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("trunk.layer4.") for k in ckpt["model"])  # the ResNet-18 trunk was trained and saved


def test_pretrained_offline_fails_with_what_to_do(tmp_path, capsys, monkeypatch):
    _torchvision()
    import urllib.error

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{folder}", "--backbone", "resnet18", "--pretrained",
                 "--image-size", "32", "--epochs", "1", "-P", "2", "-K", "2", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download the ImageNet weights of resnet18" in err
    assert "on a machine with internet access" in err and str(tmp_path / "torch-home") in err
    assert "train without --pretrained" in err


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ") and "is not a folder" in err
    assert afile.read_text() == "not a run"


def test_compare_rejects_a_bad_seed_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "digits", "--epochs", "1", "--quiet", "--seeds", "0", "-5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed must be in [0, 2**32 - 1], got -5" in err
    assert not out.exists()


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "2", "--threads", "1",
            "--quiet", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ") and "--resume" in err and "another --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing rewritten
    assert main([*args, "--resume"]) == 0  # the suggested way still works


@pytest.mark.parametrize("loss", ["pddm", "batch-hard"])
def test_a_diverged_run_is_a_one_line_error(loss, tmp_path, capsys):
    """--lr 1e30 turns the network's weights to Inf within two steps: one line naming the epoch, the
    batch and the learning rate, exit 1 (a failed run, not a bad command line)."""
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "3", "--lr", "1e30",
                 "--loss", loss, "--schedule", "constant", "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]  # after the run's header line
    assert "Traceback" not in err and last.startswith("pddm-ext: error: training diverged at epoch 1, batch ")
    assert "NaN or Inf" in last and "--lr" in last



def test_k_above_a_training_class_size_warns_that_images_repeat():
    """K larger than a training class: the P x K sampler draws that class with replacement, so the
    configuration check says so (a warning naming K, how many classes and the smallest size)."""
    from pddm_ext.app.config import check_against_data

    train_labels = torch.tensor([0] * 9 + [1] * 3 + [2] * 12)
    test_labels = torch.arange(3, 6).repeat_interleave(4)
    images = torch.zeros(len(train_labels), 1, 4, 4)
    split = data.ZeroShotSplit(data.TensorImages(images, train_labels),
                               data.TensorImages(torch.zeros(len(test_labels), 1, 4, 4), test_labels),
                               train_labels, test_labels, (1, 4, 4), dict(name="toy"))
    with pytest.warns(UserWarning, match=r"K = 8 samples per class, but 1 of the 3 training classes .* \(smallest: 3\)"):
        check_against_data(TrainConfig(dataset="digits", k=8), split)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_data(TrainConfig(dataset="digits", k=3), split)  # every class has 3 or more: silent


def test_results_md_says_what_batch_norm_did_when_not_the_default_of_a_network_from_scratch():
    from pddm_ext.app.compare import _batch_norm

    assert _batch_norm(dict(freeze_bn=True, pretrained=True)) == "; batch norm frozen"
    assert _batch_norm(dict(freeze_bn=False, pretrained=True)) == "; batch-norm statistics following the batches"
    assert _batch_norm(dict(freeze_bn=False, pretrained=False)) == _batch_norm({}) == ""


def test_freeze_bn_defaults_to_on_with_pretrained_weights_only():
    from pddm_ext.app.config import resolved_defaults

    assert TrainConfig().freeze_bn is None
    assert resolved_defaults(TrainConfig(pretrained=True)).freeze_bn is True
    assert resolved_defaults(TrainConfig()).freeze_bn is False
    for explicit in (True, False):
        for pretrained in (True, False):
            assert resolved_defaults(TrainConfig(pretrained=pretrained, freeze_bn=explicit)).freeze_bn is explicit


@pytest.mark.parametrize("freeze_bn", [True, False, None])
def test_freeze_bn_keeps_the_running_statistics_and_trains_the_rest(freeze_bn, digits, tmp_path):
    """--freeze-bn: every batch-norm layer runs in eval mode while training (its running statistics
    stay what the network started with), and its scale and shift still get trained, as every other
    weight; without it (and by default for a network trained from scratch) the statistics follow the
    training batches."""
    from pddm_ext.app.train import Run

    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=3, seed=0, threads=1, freeze_bn=freeze_bn,
                      out=str(tmp_path / "run"))
    run = Run(cfg, progress=False, split=digits)
    assert run.cfg.freeze_bn is bool(freeze_bn)  # what the run records
    freeze_bn = bool(freeze_bn)
    bns = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    run.train_epoch(0)
    for bn, old in zip(bns, before):
        stats_kept = all(torch.equal(bn.state_dict()[k], old[k]) for k in ("running_mean", "running_var",
                                                                           "num_batches_tracked"))
        assert stats_kept == freeze_bn
        assert not torch.equal(bn.weight, old["weight"])  # trained either way
        assert bn.training == (not freeze_bn)
    assert run.model.training
