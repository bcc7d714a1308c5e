"""ChannelPruner: a criterion + a FLOPs ratio -> a thinner backbone."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gating.backbones import ResidualBackbone
from gating.flops import profile_backbone
from training.pruning.criteria import Criterion, unit_inputs
from training.pruning.surgery import check_prunable, inner_flops_per_channel, prune_inner_channels


@dataclass
class ChannelPruner:
    criterion: Criterion  # how channels are ranked
    ratio: float  # fraction of backbone FLOPs to remove, in (0, 1)

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

    def prune(self, backbone: ResidualBackbone, sample: torch.Tensor | None = None) -> ResidualBackbone:
        if self.criterion.needs_data and sample is None:
            raise ValueError(f"{self.criterion.name} needs sample images")
        backbone = backbone.eval()
        keep = self.select(backbone, sample)
        if type(self.criterion).reconstruct is not Criterion.reconstruct:
            inputs = unit_inputs(backbone, sample)
            import copy

            backbone = copy.deepcopy(backbone)
            for unit, k, x in zip(backbone.units, keep, inputs):
                self.criterion.reconstruct(unit, k, x)
        return prune_inner_channels(backbone, keep)
