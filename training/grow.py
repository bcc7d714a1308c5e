"""Deepen a CIFAR ResNet by inserting identity-initialised units (Net2DeeperNet's idea for residual nets).

A new unit's last BN has gamma = beta = 0, so its residual branch outputs exactly zero and the unit
computes relu(x) = x on its non-negative input: the deeper network starts as the same function, and
training then gives the new units work to do.
"""
from __future__ import annotations

from torch import nn

from gating.backbones import ArchSpec, CifarBasicBlock, ResidualBackbone, build_backbone


def _units_per_stage(name: str) -> int:
    depth = int(name.removeprefix("resnet"))
    return (depth - 2) // 6


def placement(old_per_stage: int, new_per_stage: int) -> list[int]:
    """Where each old unit of a stage goes in the deeper stage: spread evenly, the first unit (the one
    that down-samples) staying first."""
    if new_per_stage < old_per_stage:
        raise ValueError(f"cannot grow {old_per_stage} units per stage into {new_per_stage}")
    if old_per_stage == 1:
        return [0]
    return [round(j * (new_per_stage - 1) / (old_per_stage - 1)) for j in range(old_per_stage)]


def grow(backbone: ResidualBackbone, arch: str) -> ResidualBackbone:
    """``backbone`` (a plain CIFAR ResNet) as the deeper ``arch``, computing the same function."""
    spec = backbone.spec
    if spec.inner_widths or spec.stage_widths or spec.shortcut_sources:
        raise ValueError("only an unpruned CIFAR ResNet can be grown (its spec has pruned widths)")
    if not all(isinstance(u, CifarBasicBlock) for u in backbone.units):
        raise ValueError(f"{spec.name} is not a CIFAR ResNet; only those can be grown")
    deeper = build_backbone(ArchSpec(arch, num_classes=spec.num_classes))
    old_n, new_n = _units_per_stage(spec.name), _units_per_stage(arch)
    where = placement(old_n, new_n)
    deeper.stem.load_state_dict(backbone.stem.state_dict())
    deeper.head.load_state_dict(backbone.head.state_dict())
    moved = set()
    for stage in range(3):
        for j, pos in enumerate(where):
            deeper.units[stage * new_n + pos].load_state_dict(backbone.units[stage * old_n + j].state_dict())
            moved.add(stage * new_n + pos)
    for i, unit in enumerate(deeper.units):
        if i not in moved:  # a new identity unit: its residual branch ends in a zero BN
            nn.init.zeros_(unit.bn2.weight)
            nn.init.zeros_(unit.bn2.bias)
    return deeper
