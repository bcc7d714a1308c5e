"""ChannelPruner: a criterion + a FLOPs ratio -> a thinner backbone.

Inner channels by default: each unit loses the same fraction of its inner width
(``slimming``: one global ranking). With ``stages=True``, first every stage's residual
stream loses the fraction sqrt(1 - ratio) of its channels (``thin_stages``), then the
inner channels go until the FLOPs target is met. Measured on the 2-core Xeon (default
backbone, ratio 0.5, batch 64, channels-last, ``gating.runtime`` allocator, median of 5
processes): inner only 1.46x faster, both cuts 1.41x; so the second cut is an option, not
the default. (Under glibc's default allocator both cuts looked faster: that was noise.)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from gating.backbones import ResidualBackbone
from gating.flops import profile_backbone
from training.pruning.criteria import Criterion, unit_inputs
from training.pruning.surgery import (check_prunable, inner_flops_per_channel, prune_inner_channels,
                                      prune_stage_channels, stages)


@dataclass
class ChannelPruner:
    criterion: Criterion  # how channels are ranked
    ratio: float  # fraction of backbone FLOPs to remove, in (0, 1)
    stages: bool = False  # also thin each stage's residual stream (all its units at once), then the inner cut

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pruning ratio must be in (0, 1), got {self.ratio}")

    def keep_counts(self, backbone: ResidualBackbone) -> list[int]:
        """Uniform allocation: the same fraction of inner channels in every unit meets the ratio."""
        profile = profile_backbone(backbone)
        units = sum(profile.unit_run)
        fraction = 1.0 - self.ratio * profile.full / units
        if fraction <= 0:
            raise ValueError(f"ratio {self.ratio} removes more than the units' share of FLOPs")
        return [max(1, round(fraction * u.conv1.out_channels)) for u in backbone.units]

    def select(self, backbone: ResidualBackbone, sample: torch.Tensor | None) -> list[torch.Tensor]:
        check_prunable(backbone)
        counts = self.keep_counts(backbone)
        scores = self.criterion.scores(backbone, sample, counts)
        if self.criterion.scope == "uniform":
            return [s.topk(k).indices for s, k in zip(scores, counts)]
        return self._global(backbone, scores)

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
                self.criterion.reconstruct(unit, k, x)
        return prune_inner_channels(backbone, keep)
