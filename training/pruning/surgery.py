"""Physically remove channels of CIFAR ResNets, residual-safe, in two kinds of cut.

Inner channels (conv1's outputs = bn1 = conv2's inputs) belong to one unit and go alone.
Stream channels are the residual sum a stage carries: the stem or the previous stage's
shortcut, and every unit's conv2/bn2, write each of them, and the next units' conv1, the
next stage's shortcut and the classifier read them; so a stream channel goes from all of
them at once, and the channel is then zero everywhere in the stage, as if every writer had
been cut. Down-sampling shortcuts keep working through an index map (``shortcut_sources``):
a kept output channel copies its kept input channel, or is zero; kept channels are ordered so
that the map is a slice and a zero pad, like option A itself (a channel gather cost 7% of the
pruned model's time at batch 64). Every unit keeps valid
shapes and can still be skipped. The result is an ordinary backbone whose ``ArchSpec``
records the new widths, with smaller weight tensors and recounted FLOPs.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from gating.backbones import CifarBasicBlock, ResidualBackbone, build_backbone


def check_prunable(backbone: ResidualBackbone) -> None:
    bad = [i for i, u in enumerate(backbone.units) if not isinstance(u, CifarBasicBlock)]
    if bad:
        raise ValueError(f"{backbone.spec.name}: channel pruning supports CIFAR ResNets; units {bad[:3]} are not "
                         "CIFAR basic blocks")


def stages(backbone: ResidualBackbone) -> list[list[int]]:
    """Unit indices per stage: a new stage starts at every down-sampling unit."""
    out: list[list[int]] = []
    for i, unit in enumerate(backbone.units):
        if i == 0 or not unit.identity_shortcut:
            out.append([])
        out[-1].append(i)
    return out


def stream_readers(backbone: ResidualBackbone) -> list[list[int]]:
    """Per stage, the units whose conv1 reads that stage's stream: its own units but the first (which reads
    the previous stage), and the next stage's first unit."""
    groups = stages(backbone)
    return [(g[1:] if s else g) + ([groups[s + 1][0]] if s + 1 < len(groups) else []) for s, g in enumerate(groups)]


def stream_writers(backbone: ResidualBackbone) -> list[list[tuple[nn.Conv2d, nn.BatchNorm2d]]]:
    """Per stage, the (conv, BN) pairs whose outputs are that stage's stream channels."""
    out = [[(u.conv2, u.bn2) for u in (backbone.units[i] for i in g)] for g in stages(backbone)]
    out[0].insert(0, (backbone.stem[0], backbone.stem[1]))
    return out


def _sources(unit: CifarBasicBlock) -> list[int]:
    """Input channel each output channel of a down-sampling shortcut copies (-1: zero)."""
    if unit.sources is not None:
        return [c if c < unit.conv1.in_channels else -1 for c in unit.sources.tolist()]
    start, count, before, after = unit.run
    return [-1] * before + list(range(start, start + count)) + [-1] * after


def _stream_order(keep: list[list[int]], sources: list[list[int]]) -> list[list[int]]:
    """The kept channels of each stage in an order that lets every down-sampling shortcut be a slice
    and a zero pad (no gather): what a shortcut copies sits in one block of its input and lands in one
    block of its output. CIFAR ResNets have three stages: the middle one holds [copied in only, copied
    in and out, copied out only, neither]; the first and last follow it."""
    k0, k1 = set(keep[0]), set(keep[1])
    into1 = [d for d in keep[1] if sources[0][d] in k0]  # stage-1 channels its shortcut fills
    into2 = [d for d in keep[2] if sources[1][d] in k1]
    out_of1, in1 = {sources[1][d] for d in into2}, set(into1)
    order1 = ([d for d in into1 if d not in out_of1] + [d for d in into1 if d in out_of1]
              + [d for d in keep[1] if d in out_of1 and d not in in1]
              + [d for d in keep[1] if d not in in1 and d not in out_of1])
    copied0 = [sources[0][d] for d in order1[:len(into1)]]
    order0 = copied0 + [c for c in keep[0] if c not in set(copied0)]
    position1 = {c: j for j, c in enumerate(order1)}
    order2 = sorted(into2, key=lambda d: position1[sources[1][d]]) + [d for d in keep[2] if d not in set(into2)]
    return [order0, order1, order2]


def inner_flops_per_channel(backbone: ResidualBackbone, profile) -> list[float]:
    """FLOPs one inner channel of each unit costs (its conv1 filter and its conv2 input slice)."""
    return [run / unit.conv1.out_channels for unit, run in zip(backbone.units, profile.unit_run)]


def inner_widths(backbone: ResidualBackbone, widths: list[int] | None = None) -> tuple[int, ...]:
    """The spec's per-position inner widths (0 where a unit was removed), with the present units' widths
    replaced by ``widths`` (default: their current ones)."""
    n = len(backbone.spec.inner_widths) if backbone.spec.inner_widths else backbone.num_units
    present = [i for i in range(n) if not backbone.spec.inner_widths or backbone.spec.inner_widths[i] > 0]
    widths = [u.conv1.out_channels for u in backbone.units] if widths is None else widths
    out = [0] * n
    for i, w in zip(present, widths):
        out[i] = w
    return tuple(out)


@torch.no_grad()
def prune_inner_channels(backbone: ResidualBackbone, keep: list[torch.Tensor]) -> ResidualBackbone:
    """A new backbone keeping, in unit i, only inner channels ``keep[i]`` (indices); an identity unit
    that keeps none is removed (it was its shortcut's identity plus a residual branch, now gone)."""
    check_prunable(backbone)
    if len(keep) != backbone.num_units:
        raise ValueError(f"need one index set per unit ({backbone.num_units}), got {len(keep)}")
    keep = [k.sort().values for k in keep]
    for i, (k, unit) in enumerate(zip(keep, backbone.units)):
        if len(k) == 0 and not unit.identity_shortcut:
            raise ValueError(f"unit {i} changes the shape (its shortcut is not the identity): it cannot lose "
                             "every inner channel")
        if len(k) and (k.max() >= unit.conv1.out_channels or len(k.unique()) != len(k)):
            raise ValueError(f"unit {i}: invalid channel indices {k.tolist()[:8]}")
    spec = replace(backbone.spec, inner_widths=inner_widths(backbone, [len(k) for k in keep]))
    pruned = build_backbone(spec)
    old = backbone.state_dict()
    state = {k: v.clone() for k, v in old.items() if not k.startswith("units.")}
    for j, i in enumerate(i for i, k in enumerate(keep) if len(k)):  # j: index in the pruned backbone
        k, p, q = keep[i], f"units.{i}.", f"units.{j}."
        state.update({q + name[len(p):]: v.clone() for name, v in old.items() if name.startswith(p)})
        state[q + "conv1.weight"] = old[p + "conv1.weight"][k]
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[q + f"bn1.{name}"] = old[p + f"bn1.{name}"][k]
        state[q + "conv2.weight"] = old[p + "conv2.weight"][:, k]
    pruned.load_state_dict(state)
    return pruned.train(backbone.training)


@torch.no_grad()
def prune_stage_channels(backbone: ResidualBackbone, keep: list[torch.Tensor]) -> ResidualBackbone:
    """A new backbone keeping, in stage s, only stream channels ``keep[s]`` (indices); inner widths stay."""
    check_prunable(backbone)
    groups = stages(backbone)
    if len(keep) != len(groups):
        raise ValueError(f"need one index set per stage ({len(groups)}), got {len(keep)}")
    keep = [k.sort().values for k in keep]
    widths = [backbone.units[g[0]].conv2.out_channels for g in groups]
    for s, (k, w) in enumerate(zip(keep, widths)):
        if len(k) == 0 or k.max() >= w or len(k.unique()) != len(k):
            raise ValueError(f"stage {s}: invalid channel indices {k.tolist()[:8]}")
    stage_of = {i: s for s, g in enumerate(groups) for i in g}
    old = [_sources(backbone.units[g[0]]) for g in groups[1:]]
    keep = [torch.tensor(o, dtype=torch.long) for o in _stream_order([k.tolist() for k in keep], old)]
    sources = []
    for s in range(1, len(groups)):
        position = {int(c): j for j, c in enumerate(keep[s - 1])}  # old input channel -> new index
        sources.append(tuple(position.get(old[s - 1][int(c)], -1) for c in keep[s]))
    spec = replace(backbone.spec, stage_widths=tuple(len(k) for k in keep), shortcut_sources=tuple(sources),
                   inner_widths=inner_widths(backbone))
    pruned = build_backbone(spec)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    state["stem.0.weight"] = state["stem.0.weight"][keep[0]]
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"stem.1.{name}"] = state[f"stem.1.{name}"][keep[0]]
    for i in range(backbone.num_units):
        p, s = f"units.{i}.", stage_of[i]
        read = keep[s - 1] if i == groups[s][0] and s > 0 else keep[s]
        state[p + "conv1.weight"] = state[p + "conv1.weight"][:, read]
        state[p + "conv2.weight"] = state[p + "conv2.weight"][keep[s]]
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[p + f"bn2.{name}"] = state[p + f"bn2.{name}"][keep[s]]
    state["head.2.weight"] = state["head.2.weight"][:, keep[-1]]
    pruned.load_state_dict(state)
    return pruned.train(backbone.training)
