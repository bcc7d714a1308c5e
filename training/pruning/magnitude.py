"""Unstructured magnitude pruning (Han et al. 2015) with CSR storage.

This gives sparsity, not speed: dense kernels still multiply the zeros. Per-layer
sparsity follows a sensitivity scan (how much the loss on sample images rises when one
layer alone is pruned), so sensitive layers keep more weights. ``skipserve prune``
saves the result with ``GatedModel.save(sparse=True)``: each layer that is smaller as
CSR (2a + n + 1 numbers for a layer with a non-zeros and n rows; int32 indices) is
stored so, and loads back dense.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gating.backbones import ResidualBackbone
from gating.checkpoint import CSR


MAX_LAYER_SPARSITY = 0.98  # no layer loses more: a layer with no weights left would cut the network


def prunable_layers(backbone: ResidualBackbone) -> dict[str, nn.Module]:
    return {n: m for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for weights that stay: the largest (1 - sparsity) fraction by magnitude."""
    k = int(round(sparsity * weight.numel()))
    if k <= 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.abs().flatten().kthvalue(k).values
    return weight.abs() > threshold


@torch.no_grad()
def sensitivity(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor, probe: float = 0.5) -> dict[str, float]:
    """Loss increase when each layer alone is pruned to ``probe`` sparsity."""
    backbone.eval()
    base = F.cross_entropy(backbone(x), y).item()
    out = {}
    for name, layer in prunable_layers(backbone).items():
        saved = layer.weight.clone()
        layer.weight.mul_(magnitude_mask(saved, probe))
        out[name] = max(F.cross_entropy(backbone(x), y).item() - base, 0.0)
        layer.weight.copy_(saved)
    return out


def allocate(sizes: dict[str, int], sens: dict[str, float], target: float,
             floor: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Per-layer sparsity meeting ``target`` over all weights, lower where the loss is more sensitive,
    and never below ``floor`` (the share a layer has already lost: iterative pruning holds those
    zeros, so allocating less would leave the layer, and the total, sparser than planned)."""
    floor = floor or {}
    eps = 1e-6 + 1e-3 * max(sens.values(), default=0.0)
    weights = {n: 1.0 / (sens[n] + eps) ** 0.5 for n in sizes}

    def share(n: str, c: float) -> float:
        return max(floor.get(n, 0.0), min(MAX_LAYER_SPARSITY, c * weights[n]))

    lo, hi = 0.0, 10.0 / min(weights.values())
    for _ in range(60):  # bisection on a common scale factor
        c = (lo + hi) / 2
        total = sum(share(n, c) * sizes[n] for n in sizes)
        lo, hi = (c, hi) if total < target * sum(sizes.values()) else (lo, c)
    return {n: share(n, hi) for n in sizes}


@torch.no_grad()
def magnitude_prune(backbone: ResidualBackbone, target: float, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Zero weights in place to overall sparsity ``target``; returns masks, per-layer sparsity and CSR forms."""
    if not 0.0 < target <= MAX_LAYER_SPARSITY:
        raise ValueError(f"sparsity target must be in (0, {MAX_LAYER_SPARSITY}] (no layer loses more than "
                         f"{MAX_LAYER_SPARSITY:.0%} of its weights), got {target}")
    layers = prunable_layers(backbone)
    zeros = {n: float((m.weight == 0).float().mean()) for n, m in layers.items()}  # held by earlier steps
    sparsity = allocate({n: m.weight.numel() for n, m in layers.items()}, sensitivity(backbone, x, y), target, zeros)
    masks, csr = {}, {}
    for name, layer in layers.items():
        masks[name] = magnitude_mask(layer.weight, sparsity[name])
        layer.weight.mul_(masks[name])
        csr[name] = CSR.from_dense(layer.weight)
    total = sum(m.numel() for m in masks.values())
    return {"masks": masks, "layer_sparsity": sparsity, "csr": csr,
            "sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / total,
            "csr_numbers": sum(c.numbers for c in csr.values()), "dense_numbers": total}
