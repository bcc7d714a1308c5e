"""One preprocessing path for training data and served requests: uint8 RGB -> model input."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) uint8 -> same at ``size``; antialiased bilinear, a no-op at the right size."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    batch = img if img.dim() == 4 else img[None]
    out = F.interpolate(batch.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8)
    return out if img.dim() == 4 else out[0]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W), scaled to [0, 1] then normalised per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255 - m) / s  # not in place: a float input is the caller's
