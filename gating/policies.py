"""Decision rules: scores (B, n) -> keep (B, n) bool, per image within a batch.

Scores follow the patent's convention: G(x)_i high = unit i important. Every rule
skips units in ascending score order, so the compute ``budget`` rule (skip the
lowest-scored units until the image's backbone FLOPs fit ``budget * full``) is the
per-image setting of greedy's k, or of threshold's alpha, that meets the budget,
and ``capped`` puts any rule under such a cap.
"""
from __future__ import annotations

import math

from typing import Callable, ClassVar, Optional

import torch

from gating.flops import FlopsProfile
from gating.registry import Registry

POLICIES: Registry[Callable[..., "Policy"]] = Registry("policy")


class Policy:
    name: ClassVar[str]
    online: ClassVar[bool]  # decides unit i from score i alone (usable inside one inline pass)
    needs_scores: ClassVar[bool] = True
    cap: Optional[float] = None  # the most of the backbone's FLOPs any image runs, where the rule sets it

    def __init__(self, knob: Optional[float] = None):
        self.knob = knob

    def decide(self, scores: torch.Tensor, flops: FlopsProfile, rank: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n) scores, +inf for units the rule must keep -> (B, n) bool keep. ``rank``: every unit's
        own score (the gate's ``score_all``), by which a FLOPs cap orders the units it cuts, those the
        rule keeps included; None = ``scores``."""
        raise NotImplementedError

    def decide_unit(self, score: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,) bool
        raise TypeError(f"policy {self.name!r} needs every unit's score; it cannot decide online")

    def to_dict(self) -> dict:
        return {"name": self.name, "knob": self.knob}

    @property
    def key(self) -> tuple:
        """Identity of the decisions: policies with equal keys decide alike (batches group on it)."""
        return tuple(self.to_dict().items())

    def __repr__(self) -> str:
        return f"{self.name}({self.knob})" if self.knob is not None else self.name


def ascending(scores: torch.Tensor) -> torch.Tensor:
    """(B, n) unit indices by ascending score, ties in unit order: greedy and budget skip prefixes of it."""
    return scores.argsort(dim=1, stable=True)


@POLICIES.register("full")
class Full(Policy):
    name, online, needs_scores, cap = "full", True, False, 1.0

    def __init__(self, knob: Optional[float] = None):
        if knob is not None:
            raise ValueError("policy 'full' takes no knob")
        super().__init__(None)

    def decide(self, scores, flops, rank=None):
        return torch.ones(scores.shape, dtype=torch.bool)

    def decide_unit(self, score):
        return torch.ones(score.shape, dtype=torch.bool)


@POLICIES.register("greedy")
class Greedy(Policy):
    """Skip the k lowest-scored units."""

    name, online = "greedy", False

    def __init__(self, knob: float):
        if knob is None or not math.isfinite(knob) or int(knob) != knob or knob < 0:
            raise ValueError(f"greedy needs an integer k >= 0 units to skip, got {knob!r}")
        super().__init__(int(knob))

    def decide(self, scores, flops, rank=None):
        b, n = scores.shape
        if self.knob > n:
            raise ValueError(f"greedy k={self.knob} exceeds the model's {n} units")
        keep = torch.ones(b, n, dtype=torch.bool)
        lowest = ascending(scores.detach().cpu())[:, : self.knob]
        return keep.scatter_(1, lowest, False)


@POLICIES.register("threshold")
class Threshold(Policy):
    """Skip unit i when -G(x)_i > alpha."""

    name, online = "threshold", True

    def __init__(self, knob: float):
        if knob is None or not torch.isfinite(torch.tensor(float(knob))):
            raise ValueError(f"threshold needs a finite alpha, got {knob!r}")
        super().__init__(float(knob))

    def decide(self, scores, flops, rank=None):
        return self.decide_unit(scores)

    def decide_unit(self, score):
        # in float64, as knob_for_flops sets alpha: a float32 comparison rounds alpha to the nearest float32
        return (-score.detach().cpu().double()) <= self.knob


@POLICIES.register("softmax")
class Softmax(Policy):
    """Skip unit i when softmax(-G(x))_i > alpha (softmax over the n units)."""

    name, online = "softmax", False

    def __init__(self, knob: float):
        if knob is None or not 0.0 <= float(knob) <= 1.0:
            raise ValueError(f"softmax needs alpha in [0, 1], got {knob!r}")
        super().__init__(float(knob))

    def decide(self, scores, flops, rank=None):
        return torch.softmax(-scores.detach().cpu().double(), dim=1) <= self.knob


@POLICIES.register("budget")
class Budget(Policy):
    """Skip the lowest-scored units until backbone FLOPs <= budget * the uncut backbone's full FLOPs."""

    name, online = "budget", False

    def __init__(self, knob: float):
        if knob is None or not 0.0 < float(knob) <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {knob!r}")
        super().__init__(float(knob))

    @property
    def cap(self) -> float:
        return self.knob

    def decide(self, scores, flops, rank=None):
        scores = (scores if rank is None else rank).detach().cpu()
        need = flops.full - self.knob * flops.reference  # FLOPs each image must save
        order = ascending(scores)  # least important first
        saving = flops.saving()[order]  # (B, n) in that order
        saved_before = saving.cumsum(1) - saving
        skip_sorted = saved_before < need - 1e-6  # still short of the target: skip this one too
        skip = torch.zeros_like(skip_sorted).scatter_(1, order, skip_sorted)
        return ~skip


class Capped(Policy):
    """A rule under a compute cap: the rule's decisions, then the budget rule's on top.

    The rule's path, trimmed of its lowest-ranked units until it fits ``cap * full`` (ranked by the
    gate's own scores, units the rule always keeps included). A cap of 1 is the rule alone.
    Not a registered rule: the SLO autopilot serves a model's own rule this
    way and lowers only the cap under load.
    """

    online = False

    def __init__(self, rule: Policy, cap: float):
        if isinstance(rule, (Capped, Budget, Full)):
            raise ValueError(f"cap the rule itself, not {rule!r}: use capped()")
        self.rule, self.budget = rule, Budget(cap)
        self.name = rule.name
        super().__init__(rule.knob)

    @property
    def cap(self) -> float:
        return self.budget.knob

    def decide(self, scores, flops, rank=None):
        keep = self.rule.decide(scores, flops)
        if self.cap >= 1.0:  # no image is over the whole backbone
            return keep
        rank = (scores if rank is None else rank).detach().cpu()
        first = rank.masked_fill(~keep, float("-inf"))  # the rule's skips lead, their savings counted
        return keep & self.budget.decide(scores, flops, first)

    def to_dict(self) -> dict:
        return {**self.rule.to_dict(), "cap": self.cap}

    def __repr__(self) -> str:
        return f"{self.rule!r} capped at {self.cap}"


def capped(rule: Policy, budget: float) -> Policy:
    """``rule`` with no image above ``budget`` of the backbone's FLOPs: the budget rule itself for
    ``full`` and ``budget`` (a cap on a cap is the lower one), else ``Capped``."""
    if isinstance(rule, Capped):
        rule = rule.rule
    if isinstance(rule, Full):
        return Budget(budget)
    if isinstance(rule, Budget):
        return Budget(min(budget, rule.knob))
    return Capped(rule, budget)


def make_policy(name: str, knob: Optional[float] = None) -> Policy:
    return POLICIES.get(name)(knob)


def knob_for_flops(name: str, scores: torch.Tensor, flops: FlopsProfile, ratio: float, *,
                   gate_flops: int = 0) -> float:
    """The knob of rule ``name`` (threshold or softmax) under which images scored ``scores`` (N, n)
    execute on average at most ``ratio`` of the backbone's full FLOPs, gate counted, and as close to it
    as these scores allow.

    A threshold's alpha means nothing across gates (each gate has its own scale), so a recipe that
    wants the same compute from every round's gate asks for a FLOPs ratio and sets alpha from it.
    Both rules keep unit i when a value v(x, i) <= alpha (threshold: -G(x)_i; softmax:
    softmax(-G(x))_i), so mean FLOPs grow with alpha one kept (x, i) at a time: sort the values and
    stop where the FLOPs run out. The knob returned sits halfway to the next value.
    """
    if name not in ("threshold", "softmax"):
        raise ValueError(f"a knob for a FLOPs ratio is set for the threshold and softmax rules, not {name!r}")
    if scores.dim() != 2 or scores.shape[1] != flops.num_units or scores.shape[0] == 0:
        raise ValueError(f"scores must be (images, {flops.num_units}) for this backbone, got {tuple(scores.shape)}")
    scores = scores.detach().cpu().double()
    if torch.isnan(scores).any() or (scores == float("-inf")).any():  # +inf: a unit the gate does not decide
        raise ValueError("gate scores contain NaN or -inf values: no knob can be set from them")
    values = -scores if name == "threshold" else torch.softmax(-scores, dim=1)  # keep where value <= knob
    floor = flops.minimum + gate_flops
    spare = ratio * flops.reference - floor  # mean FLOPs per image left for units
    if spare < 0:
        raise ValueError(f"a FLOPs ratio of {ratio} is below what skipping every unit costs "
                         f"({floor / flops.reference:.4f} of the backbone, gate counted)")
    weight = flops.saving().expand_as(values) / len(values)  # each (x, i) kept adds saving_i / N to the mean
    order = values.flatten().argsort()
    v, spent = values.flatten()[order], weight.flatten()[order].cumsum(0)
    last = v.numel() - 1
    fits = int((spent <= spare + 1e-9).sum()) - 1  # the last sorted value whose keeping still fits
    while fits >= 0 and fits < last and v[fits + 1] == v[fits]:  # a tie is kept whole or not at all
        fits -= 1
    if fits < 0:  # not even the lowest value fits: keep nothing
        return float(v[0] - 1.0) if name == "threshold" else 0.0
    if fits == last:  # every unit fits: keep them all
        return 1.0 if name == "softmax" else float(v[last] + 1.0)
    return float((v[fits] + v[fits + 1]) / 2)
