"""``GatedModel``: backbone + gate + policy, the unit that is trained, saved and served."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from gating.backbones import ArchSpec, ResidualBackbone, build_backbone
from gating.checkpoint import CheckpointError, ModelCard, load_tensors, save_tensors
from gating.executor import Execution, execute, mask_unit, run_unit
from gating.flops import FlopsProfile, count_flops, eval_mode, profile_backbone
from gating.fuse import fuse_bn
from gating.gates import Gate, build_gate
from gating.policies import Full, Policy, capped, make_policy


@dataclass
class GatedOutput:
    logits: torch.Tensor  # (B, classes)
    keep: torch.Tensor  # (B, n) bool: units executed per image
    scores: Optional[torch.Tensor]  # (B, n) gate scores, None under policy full
    flops: torch.Tensor  # (B,) float64: backbone FLOPs executed + gate FLOPs, per image
    passes: int  # backbone passes: 2 for an inline gate under a rule that needs every score

    @property
    def units_executed(self) -> torch.Tensor:  # (B,)
        return self.keep.sum(1)


class GatedModel(nn.Module):
    def __init__(self, backbone: ResidualBackbone, gate: Optional[Gate] = None, policy: Optional[Policy] = None,
                 card: Optional[ModelCard] = None):
        super().__init__()
        self.backbone = backbone
        self.gate = gate
        self.policy = policy or Full()
        self.card = card
        self.refresh_flops()

    def refresh_flops(self) -> None:
        """Recount FLOPs from the modules (after pruning changed the backbone, say)."""
        profile = profile_backbone(self.backbone)
        if self.backbone.uncut_spec != self.backbone.spec:  # a static cut: ratios stay against the uncut network
            uncut = profile_backbone(build_backbone(self.backbone.uncut_spec)).full
            profile = replace(profile, removed=uncut - profile.full)
        self.flops: FlopsProfile = profile
        self.gate_flops = 0 if self.gate is None else self._count_gate_flops()

    def _count_gate_flops(self) -> int:
        gate = self.gate
        param = next(gate.parameters())
        with eval_mode(gate, self.backbone):
            x = torch.zeros(1, *self.backbone.input_size, device=param.device, dtype=param.dtype)
            if gate.upfront:
                return count_flops(lambda: gate(x))
            with torch.no_grad():
                features, _ = self.backbone.unit_inputs(x)
            return count_flops(lambda: gate.score_features(features))

    @property
    def num_units(self) -> int:
        return self.backbone.num_units

    def for_inference(self) -> "GatedModel":
        """A copy with BN folded into the convolutions and weights in channels-last layout: same
        outputs (to float round-off) and FLOPs, less time.

        The copy cannot be trained or saved (it has no BN); keep the original for that.
        """
        gate = None if self.gate is None else fuse_bn(self.gate)
        fused = GatedModel(fuse_bn(self.backbone), gate, self.policy, self.card).eval()
        fused.to(memory_format=torch.channels_last)
        fused.inference_only = True
        return fused

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, policy: Optional[Policy] = None,
                execution: Execution = "skip") -> GatedOutput:
        """Gated forward pass of ``x`` (B, 3, H, W), normalised."""
        policy = policy or self.policy
        if getattr(self, "inference_only", False):
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        if not policy.needs_scores:
            keep = torch.ones(b, self.num_units, dtype=torch.bool)
            return self._output(self.backbone(x), keep, None, passes=1, gate_used=False)
        if self.gate is None:
            raise ValueError(f"policy {policy.name!r} needs a gate, and this model has none")
        if self.gate.upfront:
            real = self.gate.score_all(x)  # (B, n)
            scores = self.gate.rule_scores(real)
            keep = policy.decide(scores, self.flops, real)
            return self._output(execute(self.backbone, x, keep, execution), keep, scores, passes=1)
        if policy.online:
            return self._inline_pass(x, policy, execution)
        # Inline gate, rule needing every score: a full pass collects the scores, a second runs the path.
        features, _ = self.backbone.unit_inputs(x)
        scores = self.gate.score_features(features)
        keep = policy.decide(scores, self.flops)
        return self._output(execute(self.backbone, x, keep, execution), keep, scores, passes=2)

    @torch.no_grad()
    def decide(self, x: torch.Tensor, policy: Optional[Policy] = None) -> torch.Tensor:
        """The (B, n) decisions the gate and policy make for ``x``, with the model in eval mode.

        The backbone runs only for an inline gate, which reads the units' inputs: an up-front gate
        decides from the image alone.
        """
        policy = policy or self.policy
        with eval_mode(self):
            if not policy.needs_scores:
                return torch.ones(x.shape[0], self.num_units, dtype=torch.bool)
            if self.gate is not None and self.gate.upfront:
                real = self.gate.score_all(x)
                return policy.decide(self.gate.rule_scores(real), self.flops, real)
            return self.forward(x, policy).keep

    def _inline_pass(self, x: torch.Tensor, policy: Policy, execution: Execution) -> GatedOutput:
        gate, backbone = self.gate, self.backbone
        h = backbone.stem(x)
        state = gate.begin(x.shape[0], x.device)
        scores, keeps = [], []
        for i, unit in enumerate(backbone.units):
            s, state = gate.step(i, h, state)
            k = policy.decide_unit(s)
            scores.append(s)
            keeps.append(k)
            h = run_unit(unit, h, k) if execution == "skip" else mask_unit(unit, h, k)
        keep = torch.stack(keeps, 1)
        return self._output(backbone.head(h), keep, torch.stack(scores, 1), passes=1)

    def _output(self, logits, keep, scores, *, passes: int, gate_used: bool = True) -> GatedOutput:
        flops = self.flops.executed(keep) + (self.gate_flops if gate_used else 0)
        if passes == 2:
            flops = flops + self.flops.full  # the first pass ran every unit
        return GatedOutput(logits, keep, scores, flops, passes)

    # ---------------------------------------------------------- checkpoints
    def make_card(self) -> ModelCard:
        if self.card is None:
            raise ValueError("GatedModel has no ModelCard (class names, normalisation); pass card=")
        return replace(self.card, arch=self.backbone.spec.to_dict(),
                       gate=None if self.gate is None else self.gate.config(),
                       policy=self.policy.to_dict(), unit_flops=list(self.flops.unit_run))

    def save(self, path: os.PathLike | str, *, sparse: bool = False) -> None:
        """``sparse``: weights with enough zeros (magnitude pruning) are stored as CSR, loaded back dense."""
        if getattr(self, "inference_only", False):
            raise ValueError("this model has BN folded for inference; save the model it came from")
        tensors = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        if self.gate is not None:
            tensors.update({f"gate.{k}": v for k, v in self.gate.state_dict().items()})
        save_tensors(path, tensors, self.make_card(), sparse=sparse)

    @classmethod
    def load(cls, path: os.PathLike | str, *, policy: Optional[Policy] = None) -> "GatedModel":
        """Load a checkpoint; every way it can be unusable raises ``CheckpointError``."""
        tensors, card = load_tensors(path)
        try:
            backbone = build_backbone(ArchSpec.from_dict(card.arch))
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(path, f"bad architecture {card.arch}: {err}") from err
        _load_part(path, "backbone", backbone, tensors)
        gate = None
        if card.gate is not None:
            hyper = dict(card.gate)
            try:
                gate = build_gate(hyper.pop("kind"), backbone, **hyper)
            except (KeyError, ValueError, TypeError) as err:
                raise CheckpointError(path, f"bad gate {card.gate}: {err}") from err
            _load_part(path, "gate", gate, tensors)
        claimed = ("backbone.", "gate.") if gate is not None else ("backbone.",)
        unclaimed = sorted(k for k in tensors if not k.startswith(claimed))
        if unclaimed:
            raise CheckpointError(path, f"tensors no part of the card's model claims (a gate the card lacks?): "
                                        f"{unclaimed[:5]}")
        if policy is None:
            try:
                policy = make_policy(card.policy["name"], card.policy.get("knob"))
                if card.policy.get("cap") is not None:  # a rule saved under a FLOPs cap keeps it
                    policy = capped(policy, card.policy["cap"])
            except (KeyError, ValueError, TypeError) as err:
                raise CheckpointError(path, f"bad policy {card.policy}: {err}") from err
        model = cls(backbone, gate, policy, card)
        if card.unit_flops is not None and list(model.flops.unit_run) != list(card.unit_flops):
            raise CheckpointError(path, "per-unit FLOPs recorded in the card do not match the rebuilt "
                                        f"architecture ({card.unit_flops} vs {list(model.flops.unit_run)})")
        return model.eval()


def _load_part(path, prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    wrong = [f"{k} {tuple(own[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"shape mismatch {wrong[:5]}" if wrong else ""]
        raise CheckpointError(path, f"{prefix} weights do not match the architecture: "
                                    + "; ".join(p for p in parts if p))
    module.load_state_dict(own, strict=True)
