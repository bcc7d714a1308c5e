"""A static depth cut: residual units removed from a CIFAR ResNet for every image.

A removed unit is recorded in the architecture (``ArchSpec.inner_widths`` 0): nothing of it is
built, stored or run, and the model's FLOPs are still reported against the uncut network.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from gating.backbones import ArchSpec, ResidualBackbone, build_backbone
from gating.model import GatedModel
from gating.policies import Full
from training.data import ImageSet, normalize


def unit_positions(spec: ArchSpec, num_units: int) -> list[int]:
    """For each built unit, its index in the uncut architecture."""
    inner = spec.inner_widths or (None,) * num_units
    return [i for i, w in enumerate(inner) if w != 0]


def remove_units(backbone: ResidualBackbone, remove: Sequence[int]) -> ResidualBackbone:
    """``backbone`` without the units ``remove`` (indices among its built units); the rest keep their weights."""
    n = backbone.num_units
    remove = sorted(set(int(i) for i in remove))
    bad = [i for i in remove if not 0 <= i < n]
    if bad:
        raise ValueError(f"units {bad} out of range: the backbone has units 0..{n - 1}")
    shaping = [i for i in remove if not backbone.units[i].identity_shortcut]
    if shaping:
        raise ValueError(f"units {shaping} change the tensor's shape (they down-sample); only identity units can be removed")
    spec = backbone.spec
    positions = unit_positions(spec, n)
    # no inner widths recorded: nothing removed yet, so every unit is built and carries its own width
    inner = list(spec.inner_widths or [u.conv1.out_channels for u in backbone.units])
    for i in remove:
        inner[positions[i]] = 0
    cut = build_backbone(replace(spec, inner_widths=tuple(inner)))
    kept = [i for i in range(n) if i not in remove]
    cut.stem.load_state_dict(backbone.stem.state_dict())
    cut.head.load_state_dict(backbone.head.state_dict())
    for new, old in zip(cut.units, kept):
        new.load_state_dict(backbone.units[old].state_dict())
    return cut


@torch.no_grad()
def most_skipped(model: GatedModel, data: ImageSet, count: int, *, images: int = 10_000, seed: int = 0) -> list[int]:
    """The ``count`` units ``model``'s gate and rule skip most often on a seeded sample of ``data``."""
    if model.gate is None:
        raise ValueError("choosing units by how often they are skipped needs a gated model")
    sample = data.sample(min(images, len(data)), seed=seed)
    x = normalize(sample.images, model.card.mean, model.card.std)  # (N, 3, H, W)
    keep = torch.cat([model.decide(b) for b in x.split(250)])  # (N, n)
    rate = 1 - keep.double().mean(0)
    order = sorted(range(model.num_units), key=lambda i: (-rate[i].item(), i))
    candidates = [i for i in order if model.backbone.units[i].identity_shortcut]
    return sorted(candidates[:count])


def static_cut(model: GatedModel, remove: Sequence[int]) -> GatedModel:
    """A gateless model of ``model``'s backbone without units ``remove``: one path for every image."""
    return GatedModel(remove_units(model.backbone, remove), None, Full(), model.card)

