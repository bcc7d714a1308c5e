"""ChannelPruner: a criterion + a FLOPs ratio -> a thinner backbone.

Where the channels go (``allocation``):

* ``uniform``: each unit loses the same fraction of its inner width (``slimming``: one global
  ranking), as the papers do. Widths that are not multiples of 16 save FLOPs but little time:
  oneDNN computes convolutions in blocks of 16 channels, so 16 -> 8 costs about what 16 -> 16 does.
* ``sensitivity`` (the default of ``skipserve prune``): inner widths are multiples of ``align``
  (16), and an identity unit may keep none, which removes it. Each unit's candidate widths are
  scored by how far pruning that unit alone moves the network's output (KL divergence from the
  unpruned logits on the sample images; Li et al. 2017 allocate by the same per-layer
  sensitivity), and a knapsack over units picks the least total change that meets the FLOPs
  target. Which channels a unit keeps is still the criterion's choice (docs/pruning.md has the
  speedups).

With ``stages=True``, first every stage's residual stream loses the fraction sqrt(1 - ratio)
of its channels (``thin_stages``), then the inner channels go until the FLOPs target is met. It
bought no speed over thinning the inner channels alone, so it is an option, not the default.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from gating.backbones import ResidualBackbone
from gating.flops import profile_backbone
from training.pruning.criteria import Criterion, inner_activation, unit_inputs
from training.pruning.surgery import (check_prunable, inner_flops_per_channel, prune_inner_channels,
                                      prune_stage_channels, stages)


ALLOCATIONS = ("uniform", "sensitivity")


@dataclass
class ChannelPruner:
    criterion: Criterion  # how channels are ranked
    ratio: float  # fraction of backbone FLOPs to remove, in (0, 1)
    stages: bool = False  # also thin each stage's residual stream (all its units at once), then the inner cut
    allocation: str = "uniform"  # inner widths: "uniform" (same fraction per unit) or "sensitivity" (module doc)
    align: int = 16  # sensitivity: inner widths are multiples of this, or a unit's full width

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pruning ratio must be in (0, 1), got {self.ratio}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")

    def keep_counts(self, backbone: ResidualBackbone) -> list[int]:
        """Uniform allocation: the same fraction of inner channels in every unit meets the ratio."""
        profile = profile_backbone(backbone)
        units = sum(profile.unit_run)
        fraction = 1.0 - self.ratio * profile.full / units
        if fraction <= 0:
            raise ValueError(f"ratio {self.ratio} removes more than the units' share of FLOPs")
        return [max(1, round(fraction * u.conv1.out_channels)) for u in backbone.units]

    def select(self, backbone: ResidualBackbone, sample: torch.Tensor | None) -> list[torch.Tensor]:
        """The inner channels each unit keeps; ValueError when the ratio is out of this backbone's reach."""
        check_prunable(backbone)
        self.check_reachable(backbone)
        if self.allocation == "sensitivity":
            return self._by_sensitivity(backbone, sample)
        counts = self.keep_counts(backbone)
        scores = self.criterion.scores(backbone, sample, counts)
        if self.criterion.scope == "uniform":
            return [s.topk(k).indices for s, k in zip(scores, counts)]
        return self._global(backbone, scores)

    def check_reachable(self, backbone: ResidualBackbone) -> None:
        """Every unit keeps at least one inner channel (sensitivity: ``align`` of them, or none in an identity
        unit), so only so much can go: asked for more, say so rather than prune less than asked. Below that,
        widths come in whole channels and the FLOPs removed may differ from the ratio by a channel's share
        in each unit (``skipserve prune`` reports the ratio reached)."""
        profile = profile_backbone(backbone)
        per_channel = inner_flops_per_channel(backbone, profile)
        floor = [min(self.widths(u)) if self.allocation == "sensitivity" else 1 for u in backbone.units]
        most = sum(c * (u.conv1.out_channels - f) for c, u, f in zip(per_channel, backbone.units, floor)) / profile.full
        if self.ratio > most + 0.005:
            raise ValueError(f"ratio {self.ratio} is out of reach: with {self.allocation} allocation the units' inner "
                             f"channels can remove at most {most:.3f} of this backbone's FLOPs")

    def _global(self, backbone, scores) -> list[torch.Tensor]:
        """One ranking over every unit: drop the lowest-scored channels until the FLOPs target is met."""
        profile = profile_backbone(backbone)
        per_channel = inner_flops_per_channel(backbone, profile)
        target = self.ratio * profile.full
        entries = sorted((float(s), i, c) for i, unit_scores in enumerate(scores) for c, s in enumerate(unit_scores))
        removed, dropped = 0.0, [set() for _ in scores]
        for s, i, c in entries:
            if removed >= target:
                break
            if len(dropped[i]) + 1 >= len(scores[i]):
                continue  # keep at least one channel per unit
            dropped[i].add(c)
            removed += per_channel[i]
        return [torch.tensor([c for c in range(len(s)) if c not in d]) for s, d in zip(scores, dropped)]

    def widths(self, unit) -> list[int]:
        """The inner widths a unit may keep under ``sensitivity``: multiples of ``align`` below its width (0 only
        for an identity unit, which is then removed), and its width itself."""
        full = unit.conv1.out_channels
        return sorted({*range(0 if unit.identity_shortcut else self.align, full, self.align), full})

    @torch.no_grad()
    def _by_sensitivity(self, backbone: ResidualBackbone, sample: torch.Tensor | None) -> list[torch.Tensor]:
        if sample is None:
            raise ValueError("sensitivity allocation needs sample images (it measures each unit's output change)")
        backbone = backbone.eval()
        options = [self.widths(u) for u in backbone.units]
        full = [u.conv1.out_channels for u in backbone.units]
        chosen: dict[tuple[int, int], torch.Tensor] = {}  # (unit, width) -> the criterion's channels
        for w in sorted({w for opts in options for w in opts} - {0}):
            counts = [w if w in opts and w < f else f for opts, f in zip(options, full)]
            if counts == full:
                continue
            for i, (s, k) in enumerate(zip(self.criterion.scores(backbone, sample, counts), counts)):
                if k == w:
                    chosen[i, w] = s.topk(k).indices
        for i, unit in enumerate(backbone.units):
            if unit.identity_shortcut:
                chosen[i, 0] = torch.empty(0, dtype=torch.long)  # removed
        inputs, logits = backbone.unit_inputs(sample)
        reference = F.log_softmax(logits.float(), 1)
        costs = [[0.0 if w == f else _output_change(backbone, i, chosen[i, w], inputs[i], reference) for w in opts]
                 for i, (opts, f) in enumerate(zip(options, full))]
        profile = profile_backbone(backbone)
        per_channel = inner_flops_per_channel(backbone, profile)
        budget = sum(profile.unit_run) - self.ratio * profile.full  # FLOPs the units may keep
        flops = [[per_channel[i] * w for w in opts] for i, opts in enumerate(options)]
        pick = _knapsack(costs, flops, budget)
        if pick is None:
            raise ValueError(f"ratio {self.ratio} needs more than removing every removable unit and keeping "
                             f"its narrowest width ({self.align} channels, or all if fewer) in the others")
        widths = [opts[j] for opts, j in zip(options, pick)]
        return [torch.arange(w) if w == f else chosen[i, w] for i, (w, f) in enumerate(zip(widths, full))]

    def stage_keep_counts(self, backbone: ResidualBackbone) -> list[int]:
        fraction = math.sqrt(1.0 - self.ratio)
        return [max(1, round(fraction * backbone.units[g[0]].conv2.out_channels)) for g in stages(backbone)]

    def thin_stages(self, backbone: ResidualBackbone,
                    sample: torch.Tensor | None) -> tuple[ResidualBackbone, "ChannelPruner"]:
        """The first cut: a copy with thinner stage streams, and the inner-only pruner that finishes the job
        (its ratio is what is left of this one's, relative to the thinned backbone)."""
        check_prunable(backbone)
        backbone = backbone.eval()
        target = (1.0 - self.ratio) * profile_backbone(backbone).full  # FLOPs to keep
        counts = self.stage_keep_counts(backbone)
        keep = [s.topk(k).indices for s, k in zip(self.criterion.stream_scores(backbone, sample, counts), counts)]
        if type(self.criterion).reconstruct_stream is not Criterion.reconstruct_stream:
            backbone = copy.deepcopy(backbone)
            self.criterion.reconstruct_stream(backbone, keep, sample)
        thinned = prune_stage_channels(backbone, keep).eval()
        rest = 1.0 - target / profile_backbone(thinned).full
        if not 0.0 < rest < 1.0:
            raise ValueError(f"thinning the stages left an inner ratio of {rest:.3f}, outside (0, 1)")
        return thinned, replace(self, ratio=rest, stages=False)

    def prune(self, backbone: ResidualBackbone, sample: torch.Tensor | None = None) -> ResidualBackbone:
        if self.criterion.needs_data and sample is None:
            raise ValueError(f"{self.criterion.name} needs sample images")
        backbone = backbone.eval()
        if self.stages:
            backbone, inner = self.thin_stages(backbone, sample)
            return inner.prune(backbone, sample)
        keep = self.select(backbone, sample)
        if type(self.criterion).reconstruct is not Criterion.reconstruct:
            inputs = unit_inputs(backbone, sample)
            backbone = copy.deepcopy(backbone)
            for unit, k, x in zip(backbone.units, keep, inputs):
                if 0 < len(k) < unit.conv1.out_channels:  # a removed or untouched unit has nothing to refit
                    self.criterion.reconstruct(unit, k, x)
        return prune_inner_channels(backbone, keep)


def _output_change(backbone: ResidualBackbone, i: int, keep: torch.Tensor, x: torch.Tensor,
                   reference: torch.Tensor) -> float:
    """KL(unpruned || unit i keeping only inner channels ``keep``) on the sample whose unit-i inputs are ``x``;
    no channel kept = the unit removed (its shortcut alone)."""
    unit = backbone.units[i]
    if len(keep) == 0:
        out = unit.skip(x)
    else:
        h = inner_activation(unit, x)  # (B, inner, H, W)
        mask = torch.zeros(h.shape[1], dtype=h.dtype)
        mask[keep] = 1.0
        out = F.relu(unit.bn2(unit.conv2(h * mask.view(1, -1, 1, 1))) + unit.shortcut(x))
    for later in backbone.units[i + 1:]:
        out = later(out)
    logp = F.log_softmax(backbone.head(out).float(), 1)
    # KL is >= 0; rounding can make a harmless change -1e-16, which the knapsack would take for a gain
    return max(0.0, float(F.kl_div(logp, reference, log_target=True, reduction="batchmean")))


def _knapsack(costs: list[list[float]], flops: list[list[float]], budget: float,
              grid: int = 4000) -> list[int] | None:
    """One option per unit minimising the summed cost with summed FLOPs <= budget (FLOPs rounded up to a
    grid of ``budget / grid``, so the pick never exceeds the budget); None when nothing fits."""
    if budget <= 0:
        return None
    quantum = budget / grid
    best = {0: (0.0, [])}  # FLOPs used, in quanta -> (cost, options picked so far)
    for unit_costs, unit_flops in zip(costs, flops):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, picked) in best.items():
            for j, (c, f) in enumerate(zip(unit_costs, unit_flops)):
                total = used + math.ceil(f / quantum - 1e-9)
                if total <= grid and (total not in nxt or cost + c < nxt[total][0]):
                    nxt[total] = (cost + c, picked + [j])
        best = nxt
    # among picks of equal cost, the one that keeps the most FLOPs: pruning past the target is never asked for
    return min(best.items(), key=lambda kv: (kv[1][0], -kv[0]))[1][1] if best else None
