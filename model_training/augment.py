"""Train-time augmentation for the photo preset, on batches of uint8 images, on torch's generator.

Random resized crop (50-100 % of the area, aspect 3/4-4/3, resized back with bilinear
interpolation), horizontal flip, brightness and contrast jitter (each ±20 %). Only training
batches are augmented; validation, test, export and serving see the plain pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` in, uint8 ``[N, S, S, 3]`` out."""
    n, side = images.shape[0], images.shape[1]
    x = images.permute(0, 3, 1, 2).float()
    out = torch.empty_like(x)
    for i in range(n):
        area = float(torch.empty(1).uniform_(0.5, 1.0)) * side * side
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
        w = min(side, max(1, round(math.sqrt(area * ratio))))
        h = min(side, max(1, round(math.sqrt(area / ratio))))
        top = int(torch.randint(0, side - h + 1, (1,)))
        left = int(torch.randint(0, side - w + 1, (1,)))
        out[i] = F.interpolate(x[i : i + 1, :, top : top + h, left : left + w], size=(side, side), mode="bilinear",
                               align_corners=False)[0]
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    brightness = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean) * brightness
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
