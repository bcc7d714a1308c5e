"""Physically remove inner channels of CIFAR residual units (residual-safe).

Only a unit's inner width (conv1's outputs = bn1 = conv2's inputs) shrinks; the
widths that shortcuts add up stay, so every unit keeps its shapes and can still be
skipped. The result is an ordinary backbone whose ``ArchSpec.inner_widths`` records
the new widths, with smaller weight tensors and recounted FLOPs.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from gating.backbones import CifarBasicBlock, ResidualBackbone, build_backbone


def check_prunable(backbone: ResidualBackbone) -> None:
    bad = [i for i, u in enumerate(backbone.units) if not isinstance(u, CifarBasicBlock)]
    if bad:
        raise ValueError(f"{backbone.spec.name}: channel pruning supports CIFAR ResNets; units {bad[:3]} are not "
                         "CIFAR basic blocks")


def inner_flops_per_channel(backbone: ResidualBackbone, profile) -> list[float]:
    """FLOPs one inner channel of each unit costs (its conv1 filter and its conv2 input slice)."""
    return [run / unit.conv1.out_channels for unit, run in zip(backbone.units, profile.unit_run)]


@torch.no_grad()
def prune_inner_channels(backbone: ResidualBackbone, keep: list[torch.Tensor]) -> ResidualBackbone:
    """A new backbone keeping, in unit i, only inner channels ``keep[i]`` (indices)."""
    check_prunable(backbone)
    if len(keep) != backbone.num_units:
        raise ValueError(f"need one index set per unit ({backbone.num_units}), got {len(keep)}")
    keep = [k.sort().values for k in keep]
    for i, (k, unit) in enumerate(zip(keep, backbone.units)):
        if len(k) == 0 or k.max() >= unit.conv1.out_channels or len(k.unique()) != len(k):
            raise ValueError(f"unit {i}: invalid channel indices {k.tolist()[:8]}")
    spec = replace(backbone.spec, inner_widths=tuple(len(k) for k in keep))
    pruned = build_backbone(spec)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for i, k in enumerate(keep):
        p = f"units.{i}."
        state[p + "conv1.weight"] = state[p + "conv1.weight"][k]
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[p + f"bn1.{name}"] = state[p + f"bn1.{name}"][k]
        state[p + "conv2.weight"] = state[p + "conv2.weight"][:, k]
    pruned.load_state_dict(state)
    return pruned.train(backbone.training)
