"""The icons dataset (pddm_ext.app.icons) on a small theme folder generated here: families counted once,
the file nearest the size chosen, SVGs rasterised, alpha on white, content de-duplication, names with
too few samples skipped, the zero-shot split, the cache and its hash, training one step on it."""

import json
import os

import numpy as np
import pytest

from pddm_ext.app import datasets as data
from pddm_ext.app import icons

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

if os.environ.get("PDDM_EXT_REQUIRE_PRETRAINED") == "1":  # make test installs resvg-py with the rest
    import resvg_py  # noqa: F401
else:
    pytest.importorskip("resvg_py", reason="resvg-py is not installed (make test installs it)")

SIZE = 16
COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 160, 30), (120, 30, 160), (30, 160, 160),
           (90, 90, 90), (240, 120, 0), (0, 90, 240), (160, 0, 90)]


def _png(path, colour, shape, *, size=SIZE, alpha=255):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    px = img.load()
    for y in range(size):
        for x in range(size):
            inside = {"square": 2 <= x < size - 2 and 2 <= y < size - 2,
                      "bar": size // 3 <= y < 2 * size // 3,
                      "diag": abs(x - y) <= 2}[shape]
            if inside:
                px[x, y] = colour + (alpha,)
    img.save(path)


def _svg(path, colour):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    r, g, b = colour
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32" viewBox="0 0 32 32">'
                f'<circle cx="16" cy="16" r="12" fill="rgb({r},{g},{b})"/></svg>')


def _themes(root):
    """Themes t0..t5, one family each, plus t0-dark (t0's family, t0's art in other colours), drawing:
    'square' in all 6 families (t1's in the 16 px folder and a wrong-size copy elsewhere), 'circle'
    as SVG in 5 (one a duplicate of another's), 'bar' in 3 families only, 'alias' a symlink to
    'square' in every theme, and symbolic or hi-dpi files that must be ignored."""
    for t in range(6):
        theme = root / f"t{t}"
        _png(str(theme / f"{SIZE}x{SIZE}" / "apps" / "square.png"), COLOURS[t], "square")
        _png(str(theme / "32x32" / "apps" / "square.png"), COLOURS[-1 - t], "diag", size=32)
        os.symlink("square.png", theme / f"{SIZE}x{SIZE}" / "apps" / "alias.png")
        _png(str(theme / f"{SIZE}x{SIZE}" / "apps" / "square-symbolic.png"), (0, 0, 0), "bar")
        _png(str(theme / f"{SIZE}x{SIZE}@2x" / "apps" / "hidpi.png"), COLOURS[t], "bar")
        _png(str(theme / "apps" / f"{SIZE}@2x" / "hidpi.png"), COLOURS[t], "diag")
        _png(str(theme / f"{SIZE}x{SIZE}" / "symbolic" / "mono.png"), COLOURS[t], "bar")
        if t < 5:
            _svg(str(theme / "scalable" / "apps" / "circle.svg"), COLOURS[min(t, 3)])  # t3 and t4 identical
        if t < 3:
            _png(str(theme / "apps" / str(SIZE) / "bar.png"), COLOURS[t], "bar", alpha=128)
    _png(str(root / "t0-dark" / f"{SIZE}x{SIZE}" / "apps" / "square.png"), (0, 0, 0), "square")
    _png(str(root / "t0-dark" / f"{SIZE}x{SIZE}" / "apps" / "bar.png"), (0, 0, 0), "bar")
    os.makedirs(root / "cursors-only" / "cursors")
    return {"t0": "f0", "t0-dark": "f0", "cursors-only": None}  # t1..t5: a family of their own


@pytest.fixture
def theme_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "icons"
    families = _themes(root)
    return root, families


def test_rule_on_a_generated_theme_folder(theme_root):
    root, families = theme_root
    images, labels, names, info = icons.build_icons(str(root), size=SIZE, min_samples=4, families=families)
    # square: 6 families (t0-dark's art is not used: t0 comes first in f0); alias: all duplicates of
    # square; circle: 5 families, t3 = t4, so 4 distinct; bar: 3 families (t0-dark adds none): skipped
    assert names == ["circle", "square"]
    counts = np.bincount(labels)
    assert counts.tolist() == [4, 6]
    assert images.shape == (10, 3, SIZE, SIZE) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 10  # every image distinct
    square = images[labels == 1]
    # the 16 px files were taken (filled squares, not the 32 px diagonals), corners white background
    assert (square[:, :, 0, 0] == 255).all() and (square[:, :, SIZE // 2, SIZE // 2] != 255).any(axis=1).all()
    assert square[0, :, SIZE // 2, SIZE // 2].tolist() == list(COLOURS[0])
    circle = images[labels == 0]  # rasterised from SVG: a red disc in the middle, white corners
    assert circle[0, :, SIZE // 2, SIZE // 2].tolist() == list(COLOURS[0]) and (circle[:, :, 0, 0] == 255).all()
    assert info["icon_themes"] == {"t0": "f0", "t1": "t1", "t2": "t2", "t3": "t3", "t4": "t4", "t5": "t5"}
    assert len(info["icon_hash"]) == 64 and info["icon_size"] == SIZE and info["icon_background"] == [255, 255, 255]


def test_alpha_is_composited_onto_white(theme_root):
    root, families = theme_root
    images, labels, names, _ = icons.build_icons(str(root), size=SIZE, min_samples=3, families=families)
    bar = images[labels == names.index("bar")]
    # half-transparent colour c over white: (c + 255) / 2
    expected = [(c * 128 + 255 * 127) // 255 for c in COLOURS[0]]
    assert np.abs(bar[0, :, SIZE // 2, SIZE // 2].astype(int) - expected).max() <= 1


def test_cache_is_reused_and_changes_with_the_files(theme_root, capsys):
    root, families = theme_root
    first = icons.build_icons(str(root), size=SIZE, min_samples=4, families=families)
    assert capsys.readouterr().err.startswith("icons: rendering ")  # a first run says why it takes a while
    cached = os.listdir(os.path.join(os.environ["XDG_CACHE_HOME"], "pddm-ext", "icons"))
    assert len(cached) == 1
    again = icons.build_icons(str(root), size=SIZE, min_samples=4, families=families)
    assert capsys.readouterr().err == ""  # the cached set renders nothing
    assert np.array_equal(first[0], again[0]) and first[3]["icon_hash"] == again[3]["icon_hash"]
    _png(str(root / "t2" / f"{SIZE}x{SIZE}" / "apps" / "square.png"), (1, 2, 3), "square")
    changed = icons.build_icons(str(root), size=SIZE, min_samples=4, families=families)
    assert changed[3]["icon_hash"] != first[3]["icon_hash"]
    assert changed[0][changed[1] == 1][2, :, SIZE // 2, SIZE // 2].tolist() == [1, 2, 3]


def test_load_dataset_splits_names_half_seen_half_unseen(theme_root):
    root, families = theme_root
    split = data.load_icons(str(root), size=SIZE, min_samples=3, families=families)
    assert split.info["train_classes"] == ["bar"] and split.info["test_classes"] == ["circle", "square"]
    assert split.image_shape == (3, SIZE, SIZE)
    x, _ = split.train[0]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_too_few_samples_or_no_folder_is_a_dataset_error(theme_root, tmp_path):
    root, families = theme_root
    with pytest.raises(data.DatasetError, match="no icon name .* 7 or more"):
        data.load_icons(str(root), size=SIZE, min_samples=7, families=families)
    with pytest.raises(data.DatasetError, match="make icons"):
        data.load_dataset(f"icons:{tmp_path / 'nothing'}")


def test_choose_file_prefers_exact_raster_then_vector_then_larger():
    c = [(16, "a/16/x.png"), (float("inf"), "a/scalable/x.svg"), (24, "a/24/x.svg"), (32, "a/32/x.png"),
         (8, "a/8/x.png")]
    assert icons.choose_file(c, 16) == (16, "a/16/x.png")
    assert icons.choose_file(c, 20) == (24, "a/24/x.svg")
    assert icons.choose_file(c, 48) == (float("inf"), "a/scalable/x.svg")
    assert icons.choose_file([(32, "x.png"), (8, "y.png"), (64, "z.png")], 16) == (32, "x.png")
    assert icons.choose_file([(8, "y.png"), (12, "z.png")], 16) == (12, "z.png")


def test_cli_trains_one_step_on_an_icon_folder(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from pddm_ext.app.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "themes"
    rng = np.random.default_rng(0)
    for t in range(10):  # 10 themes, each its own family, drawing 4 names in random colours
        for name in ("a", "b", "c", "d"):
            _png(str(root / f"theme{t}" / "32x32" / "apps" / f"{name}.png"),
                 tuple(int(v) for v in rng.integers(0, 255, 3)), ["square", "bar", "diag", "square"][ord(name) - 97])
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"icons:{root}", "--image-size", "32", "--epochs", "1",
                 "--batches-per-epoch", "1", "-P", "2", "-K", "2", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"]["name"] == "icons" and result["dataset"]["num_classes"] == 4
    assert result["dataset"]["train_classes"] == ["a", "b"] and len(result["dataset"]["icon_themes"]) == 10
