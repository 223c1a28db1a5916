"""``folder:`` datasets: every image mode converted to RGB by the documented rule, unreadable files and
test halves that cannot be evaluated reported in one line before training."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
Image = pytest.importorskip("PIL.Image")

from pddm_ext.app import datasets as data  # noqa: E402
from pddm_ext.app import folder_images  # noqa: E402
from pddm_ext.app import evaluate as ev  # noqa: E402
from pddm_ext.app.cli import main  # noqa: E402

W, H = 64, 8


def _rgb(path):
    with Image.open(path) as f:
        out = folder_images.to_rgb(f)
    assert out.mode == "RGB" and out.size == (W, H)
    return np.asarray(out).astype(int)


def _ramp(top, dtype):
    """A horizontal gradient from 0 to ``top`` (H x W)."""
    return np.tile(np.linspace(0, top, W), (H, 1)).astype(dtype)


def _grey(rgb):
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # replicated grey
    return rgb[..., 0]


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    ramp = _ramp(65535, np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as f:
        assert f.mode == "I;16"
    grey = _grey(_rgb(tmp_path / "g.png"))
    assert np.array_equal(grey, np.round(ramp / 65535 * 255).astype(int))  # a ramp, not all white
    assert grey.min() == 0 and grey.max() == 255 and abs(int(grey[0, W // 2]) - 128) <= 3


def test_a_transparent_grey_value_of_a_16_bit_png_is_white(tmp_path):
    ramp = _ramp(65535, np.uint16)
    ramp[:, :4] = 1000  # the transparent value (PNG tRNS of a grey image)
    Image.fromarray(ramp).save(tmp_path / "t.png", transparency=1000)
    grey = _grey(_rgb(tmp_path / "t.png"))
    assert (grey[:, :4] == 255).all()
    assert np.array_equal(grey[:, 4:], np.round(ramp[:, 4:] / 65535 * 255).astype(int))


def test_32_bit_integer_tiff_and_16_bit_pgm_are_scaled_by_their_bit_depth(tmp_path):
    ramp = _ramp(2**31 - 1, np.int64).astype(np.int32)
    Image.fromarray(ramp).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as f:
        assert f.mode == "I"
    assert np.array_equal(_grey(_rgb(tmp_path / "i.tif")), np.round(ramp / (2**31 - 1) * 255).astype(int))
    ramp16 = _ramp(65535, np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "g.pgm")  # Pillow opens a 16-bit PGM as mode I
    with Image.open(tmp_path / "g.pgm") as f:
        assert f.mode == "I"
    assert np.array_equal(_grey(_rgb(tmp_path / "g.pgm")), np.round(ramp16 / 65535 * 255).astype(int))


def test_float_tiff_is_read_in_0_1_and_what_is_clipped_is_reported(tmp_path):
    ramp = _ramp(1.0, np.float32)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as f:
        assert f.mode == "F" and folder_images.conversion_note(f) is None
    grey = _grey(_rgb(tmp_path / "f.tif"))
    assert np.array_equal(grey, np.round(ramp.astype(np.float64) * 255).astype(int))  # a ramp, not all black
    wide = _ramp(4.0, np.float32) - 1.0  # -1 .. 3
    wide[0, 0] = np.nan
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    grey = _grey(_rgb(tmp_path / "wide.tif"))
    assert grey[0, 0] == 0 and grey[1, 0] == 0 and grey[1, -1] == 255  # NaN and below 0: black; above 1: white
    assert folder_images.check_image(tmp_path / "wide.tif") == (None, "float pixels that are NaN or infinite")
    wide[0, 0] = 0.5
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    problem, note = folder_images.check_image(tmp_path / "wide.tif")
    assert problem is None and "outside [0, 1]" in note and "clipped" in note


def test_alpha_is_composited_onto_white(tmp_path):
    alpha = _ramp(255, np.uint8)  # transparent on the left, opaque on the right
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, alpha  # red 200 over a ramp of alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _rgb(tmp_path / "rgba.png")
    a = alpha.astype(float) / 255
    assert np.abs(out[..., 0] - (200 * a + 255 * (1 - a))).max() <= 1
    assert np.abs(out[..., 1] - 255 * (1 - a)).max() <= 1  # green and blue: the white showing through
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, -1]) == (200, 0, 0)
    la = np.stack([np.full((H, W), 40, np.uint8), alpha], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = _grey(_rgb(tmp_path / "la.png"))
    assert np.abs(grey - (40 * a + 255 * (1 - a))).max() <= 1


def test_palette_with_transparency_cmyk_bilevel_and_grey(tmp_path):
    index = np.zeros((H, W), np.uint8)
    index[:, W // 2:] = 1
    pal = Image.fromarray(index, "P")
    pal.putpalette([10, 20, 30, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 transparent
    out = _rgb(tmp_path / "p.png")
    assert (out[:, : W // 2] == 255).all() and (out[:, W // 2:] == [0, 0, 255]).all()
    pal.save(tmp_path / "p.gif")  # the same palette without transparency: its colours
    out = _rgb(tmp_path / "p.gif")
    assert (out[:, : W // 2] == [10, 20, 30]).all() and (out[:, W // 2:] == [0, 0, 255]).all()

    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:, : W // 2, 0] = 255  # cyan
    cmyk[:, W // 2:, 3] = 255  # black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    out = _rgb(tmp_path / "c.tif")
    assert (out[:, : W // 2] == [0, 255, 255]).all() and (out[:, W // 2:] == 0).all()

    bits = _ramp(1, np.uint8).astype(bool)
    bits[:, W // 2:] = True
    Image.fromarray(bits).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as f:
        assert f.mode == "1"
    grey = _grey(_rgb(tmp_path / "b.png"))
    assert set(np.unique(grey)) == {0, 255} and (grey[:, W // 2:] == 255).all()

    ramp = _ramp(255, np.uint8)
    Image.fromarray(ramp, "L").save(tmp_path / "l.png")
    assert np.array_equal(_grey(_rgb(tmp_path / "l.png")), ramp.astype(int))


def _folder(root, per_class, size=20, seed=0):
    """Classes c00, c01, ... with per_class[i] random RGB images each."""
    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        os.makedirs(root / f"c{c:02d}", exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def test_a_16_bit_image_reaches_the_batch_as_its_gradient(tmp_path):
    root = _folder(tmp_path / "d", [3, 3, 5, 5])
    ramp = np.tile(np.linspace(0, 65535, 32), (32, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "c03" / "0.png")  # replaces an RGB image of a test class
    split = data.load_dataset(f"folder:{root}", image_size=16)
    index = split.test.paths.index(str(root / "c03" / "0.png"))
    x, _ = split.test[index]
    mean = torch.tensor(folder_images.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(folder_images.IMAGENET_STD).view(3, 1, 1)
    pixels = (x * std + mean)[0]
    assert float(pixels[:, 0].mean()) < 0.2 and float(pixels[:, -1].mean()) > 0.8  # dark to light, not all white


@pytest.mark.parametrize("bad, reason", [
    (b"this is a text file\n", "cannot identify image file"),
    (b"", "cannot identify image file"),
    ("half a jpeg", "truncated"),
    ("half a png", "runcated"),
])
def test_an_unreadable_file_is_found_before_training(bad, reason, tmp_path, capsys):
    root = _folder(tmp_path / "d", [4, 4, 5, 5])
    if isinstance(bad, str):  # a file cut short: the header is fine, the data ends early
        kind = bad.split()[-1]
        whole = tmp_path / f"whole.{kind}"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(whole)
        content = whole.read_bytes()
        bad = content[: len(content) // 2]
    name = "bad.jpg"
    (root / "c02" / name).write_bytes(bad)
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset(f"folder:{root}", image_size=16)
    message = str(info.value)
    assert "\n" not in message and os.path.join("c02", name) in message and reason in message
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--image-size", "16", "--backbone", "small",
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ") and os.path.join("c02", name) in err
    assert not out.exists()


def test_a_float_image_that_is_clipped_is_named_in_a_warning(tmp_path):
    root = _folder(tmp_path / "d", [4, 4, 5, 5])
    Image.fromarray(np.full((20, 20), 300.0, np.float32)).save(root / "c01" / "hot.tif")
    with pytest.warns(UserWarning, match=r"1 image\(s\) lose values .*c01.hot\.tif: float pixels outside \[0, 1\]"):
        data.load_dataset(f"folder:{root}", image_size=16)


@pytest.mark.parametrize("per_class, message", [
    ([3] * 10 + [1] * 10, "10 test class(es) with a single image ('c10', 'c11', 'c12', 'c13', 'c14', ...)"),
    ([3, 3, 9, 1], "1 test class(es) with a single image ('c03')"),
    ([5, 5, 3, 4], "7 test image(s); Recall@8 ranks 8 other images per query"),
])
def test_a_test_half_that_cannot_be_evaluated_is_one_line(per_class, message, tmp_path, capsys):
    root = _folder(tmp_path / "d", per_class)
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--image-size", "16", "--backbone", "small",
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ") and "cannot be evaluated" in err
    assert message in err, err
    assert not out.exists()


def test_evaluation_problem_matches_where_the_metrics_fail():
    """The rule names exactly the label sets on which retrieval_metrics is undefined or degenerate."""
    emb = torch.randn(12, 4, dtype=torch.float64)
    fine = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4])
    assert "single image ('4')" in ev.evaluation_problem(fine)
    fine[-1] = 0
    assert ev.evaluation_problem(fine) is None
    ev.retrieval_metrics(emb, fine)  # defined
    small = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert "Recall@8" in ev.evaluation_problem(small)
    with pytest.raises(ValueError, match="cutoffs"):
        ev.retrieval_metrics(emb[:8], small)
    singles = torch.arange(12)
    with pytest.raises(ValueError, match="MAP@R"):
        ev.retrieval_metrics(emb, singles)
    assert ev.evaluation_problem(singles, class_names=[f"n{i}" for i in range(12)]).startswith(
        "12 test class(es) with a single image ('n0', 'n1', 'n2', 'n3', 'n4', ...)")


def test_small_training_classes_train_without_a_held_out_set(tmp_path):
    """Training classes of 3 images hold none out (a class needs 4 to give 2 and keep 2): the run trains
    and evaluates, with the unit's diagnostics on the unseen classes only."""
    root = _folder(tmp_path / "d", [3, 3, 5, 5])
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--image-size", "16", "--backbone", "small", "-P", "2",
                 "-K", "2", "--epochs", "1", "--batches-per-epoch", "1", "--embedding-dim", "8", "--threads", "1",
                 "--quiet", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "result.json").read_text())["history"]
    assert entry["unit"]["heldout"] is None and entry["unit"]["unseen"]["pairs"] == 45


def test_glyphs_from_a_single_font_cannot_be_evaluated(tmp_path, capsys):
    """The same rule for every dataset: one font draws each character once, so every test class has a
    single image, and the run stops with one line before training."""
    import shutil

    import matplotlib

    fonts = tmp_path / "fonts"
    fonts.mkdir()
    shutil.copy(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), fonts)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--font-dir", str(fonts), "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset glyphs cannot be evaluated: 31 test class(es) with a single image ('V', 'W'" in err
    assert not out.exists()


def test_hidden_folders_and_files_are_no_classes_and_no_images(tmp_path):
    root = _folder(tmp_path / "d", [3, 3, 5, 5])
    for hidden in (root / ".ipynb_checkpoints", root / "c00" / ".thumbnails"):
        hidden.mkdir()
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(hidden / "0.png")
    (root / "c01" / "._0.png").write_bytes(b"\x00\x05\x16\x07 a resource fork, not an image")
    split = data.load_dataset(f"folder:{root}", image_size=16)
    paths = split.train.paths + split.test.paths
    assert len(paths) == 16 and not any("/." in p for p in paths)
    assert split.info["train_classes"] == ["c00", "c01"]


def test_evaluation_resamples_only_the_centre_crop_whatever_the_aspect_ratio(tmp_path, monkeypatch):
    """A 20000 x 1 strip is evaluated from its centre (1 x 1 px of it) without resizing the whole strip
    to 256 rows of 5 million pixels; an ordinary image gives what resize-then-centre-crop gives."""
    strip = np.zeros((1, 20000, 3), np.uint8)
    strip[0, 9999:10001] = 200  # the centre pixels; the rest black
    Image.fromarray(strip).save(tmp_path / "strip.png")
    photo = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    images = folder_images.FolderImages([str(tmp_path / "strip.png"), str(tmp_path / "photo.png")], [0, 1], size=14,
                               train=False)
    mean = torch.tensor(folder_images.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(folder_images.IMAGENET_STD).view(3, 1, 1)
    resize, sizes = Image.Image.resize, []
    monkeypatch.setattr(Image.Image, "resize", lambda im, size, *a, **k: sizes.append(tuple(size)) or resize(im, size, *a, **k))
    x, _ = images[0]
    assert sizes == [(14, 14)]  # no intermediate image of the whole strip
    assert x.shape == (3, 14, 14) and torch.allclose(x * std + mean, torch.full((3, 14, 14), 200 / 255), atol=1e-6)
    x, _ = images[1]
    resized = Image.fromarray(photo).resize((24, 16), Image.BILINEAR)  # short side 16 = 14 * 8/7
    want = np.asarray(resized.crop((5, 1, 19, 15)), dtype=np.float32) / 255
    got = (x * std + mean).permute(1, 2, 0).numpy()
    assert np.abs(got - want).mean() < 0.02  # the same region: sampled once instead of twice
