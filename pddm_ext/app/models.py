"""Embedding networks: a small CNN for the 8x8 / 28x28 / 32x32 sets, a torchvision backbone for
``folder:`` datasets when torchvision is importable. Every model returns L2-normalised embeddings
(docs/design.md, "The loss": features live on the unit hypersphere)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels; 2x2 max-pool after the first two when the
    image is large enough), global average pooling, a linear layer to ``embedding_dim``, L2-normalised.
    About 100k parameters: one epoch of mnist5k takes seconds on two CPU cores."""

    def __init__(self, in_channels=1, embedding_dim=64, image_size=28):
        super().__init__()
        pool = image_size >= 16  # 8x8 digits keep their resolution
        layers = [_block(in_channels, 32)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [_block(32, 64)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [_block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(128, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x):
        return F.normalize(self.embed(self.features(x)), dim=1)


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


def resolve_backbone(image_shape, backbone="auto"):
    """``"resnet18"`` or ``"small"``: what ``backbone`` means for images of ``image_shape`` (C, H, W);
    ``"auto"`` is resnet18 for 3-channel images of 64 px or more when torchvision is importable."""
    c, h, _ = image_shape
    if backbone == "resnet18" or (backbone == "auto" and c == 3 and h >= 64 and torchvision_available()):
        return "resnet18"
    return "small"


def build_model(image_shape, embedding_dim=64, *, backbone="auto", pretrained=False):
    """The embedding network for images of ``image_shape`` (C, H, W).

    ``backbone``: ``"small"`` (SmallCNN), ``"resnet18"`` (torchvision; an error if missing) or
    ``"auto"``: resnet18 for 3-channel images of 64 px or more when torchvision is importable,
    else SmallCNN. ``pretrained``: the ResNet's ImageNet weights (see TorchvisionEmbedder). Returns
    (model, description).
    """
    if resolve_backbone(image_shape, backbone) == "resnet18":
        model = TorchvisionEmbedder(embedding_dim, pretrained=pretrained)
        weights = f"ImageNet weights from {model.pretrained}" if model.pretrained else "random init"
        return model, f"resnet18 ({weights})"
    return SmallCNN(image_shape[0], embedding_dim, image_shape[1]), "small-cnn"
