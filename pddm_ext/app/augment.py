"""Random affine augmentation of image batches for ``pddm-ext train --augment``.

torchvision's ``RandomAffine`` draws one transform per call; metric-learning trainers want one per
image, and torchvision is an optional dependency here, so this draws per-image parameters and
applies them with ``torch.nn.functional.affine_grid`` / ``grid_sample`` (bilinear, zero padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEGREES, TRANSLATE, SCALE, SHEAR = 10.0, 0.1, (0.9, 1.1), 10.0


def random_affine(x, *, degrees=DEGREES, translate=TRANSLATE, scale=SCALE, shear=SHEAR, generator=None):
    """Each image of ``x`` (n, c, h, w) floating, rotated by U(-degrees, degrees), sheared (x-shear)
    by U(-shear, shear) degrees, scaled by U(*scale) and shifted by U(-translate, translate) of its
    size in each direction; same shape and dtype. Draws from ``generator`` (default: torch's global
    RNG, which the app's checkpoints save, so a resumed run draws the same transforms)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (n, c, h, w) batch, got {tuple(x.shape)} {x.dtype}")
    n = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    rot = uniform(-degrees, degrees) * math.pi / 180
    sh = uniform(-shear, shear) * math.pi / 180
    s = uniform(*scale)
    tx, ty = 2 * uniform(-translate, translate), 2 * uniform(-translate, translate)  # grid spans [-1, 1]
    cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(sh)
    # affine_grid maps output to input coordinates: the inverse scale, rotation with shear
    theta = torch.stack([torch.stack([cos / s, (cos * tan - sin) / s, tx], 1),
                         torch.stack([sin / s, (sin * tan + cos) / s, ty], 1)], 1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
