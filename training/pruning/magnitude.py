"""Unstructured magnitude pruning (Han et al. 2015) with CSR export.

This gives sparsity, not speed: dense kernels still multiply the zeros. Per-layer
sparsity follows a sensitivity scan (how much the loss on sample images rises when one
layer alone is pruned), so sensitive layers keep more weights; the stored form is CSR,
2a + n + 1 numbers for a layer with a non-zeros and n rows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gating.backbones import ResidualBackbone


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
        return max(floor.get(n, 0.0), min(0.98, c * weights[n]))

    lo, hi = 0.0, 10.0 / min(weights.values())
    for _ in range(60):  # bisection on a common scale factor
        c = (lo + hi) / 2
        total = sum(share(n, c) * sizes[n] for n in sizes)
        lo, hi = (c, hi) if total < target * sum(sizes.values()) else (lo, c)
    return {n: share(n, hi) for n in sizes}


@dataclass
class CSR:
    values: torch.Tensor  # (a,) non-zero weights
    columns: torch.Tensor  # (a,) their column indices
    row_ptr: torch.Tensor  # (n + 1,) start of each row in values
    shape: tuple[int, ...]  # the dense layer's weight shape

    @property
    def numbers(self) -> int:
        return len(self.values) + len(self.columns) + len(self.row_ptr)  # 2a + n + 1

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "CSR":
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we only store and restore
            warnings.simplefilter("ignore", UserWarning)
            m = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
        return cls(m.values().clone(), m.col_indices().clone(), m.crow_indices().clone(), tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        rows = self.shape[0]
        cols = int(torch.tensor(self.shape[1:]).prod()) if len(self.shape) > 1 else 1
        m = torch.sparse_csr_tensor(self.row_ptr, self.columns, self.values, size=(rows, cols),
                                    check_invariants=True)
        return m.to_dense().reshape(self.shape)


@torch.no_grad()
def magnitude_prune(backbone: ResidualBackbone, target: float, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Zero weights in place to overall sparsity ``target``; returns masks, per-layer sparsity and CSR forms."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"sparsity target must be in (0, 1), got {target}")
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
