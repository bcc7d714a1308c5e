"""A checkpoint's cap curve: validation top-1 under FLOPs caps, as ``skipserve eval --cap`` measures it.

Stored in the model card (``info["cap_curve"]``) when the model is made, so that a server knows what
accuracy each cap costs without data: the SLO autopilot lowers the cap no further than the curve
allows (``CapCurve.floor``) and reports the top-1 it expects at the cap it serves (``top1_at``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class CapPoint:
    cap: float  # the cap: no image above this fraction of the uncut backbone's FLOPs, in (0, 1]
    top1: float  # validation top-1 served under it
    flops_ratio: float  # mean executed FLOPs under it (gate counted), a fraction of the uncut backbone's


@dataclass(frozen=True)
class CapCurve:
    """Points at distinct caps, ascending; ``top1`` is the model's own, uncapped."""

    points: tuple[CapPoint, ...]
    top1: float

    def __post_init__(self):
        caps = [p.cap for p in self.points]
        if not caps or caps != sorted(set(caps)) or not all(0 < c <= 1 for c in caps):
            raise ValueError(f"a cap curve needs distinct caps in (0, 1], ascending; got {caps}")
        if not all(0 <= p.top1 <= 1 for p in self.points) or not 0 <= self.top1 <= 1:
            raise ValueError("cap curve top-1 values must be fractions in [0, 1]")

    def to_dict(self) -> dict:
        return {"top1": self.top1, "points": [vars(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: Any) -> "CapCurve":
        try:
            return cls(tuple(CapPoint(float(p["cap"]), float(p["top1"]), float(p["flops_ratio"]))
                             for p in d["points"]), float(d["top1"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a cap curve: {d!r} ({err})") from None

    @classmethod
    def of_card(cls, info: dict) -> Optional["CapCurve"]:
        """The curve in a model card's ``info``, or None when it has none."""
        return cls.from_dict(info["cap_curve"]) if "cap_curve" in info else None

    def floor(self, max_drop: float) -> Optional[float]:
        """The lowest measured cap from which every higher one scores within ``max_drop`` (a fraction,
        0.01 = 1 pp) of the model's own top-1; None when not even the highest does."""
        best = None
        for p in reversed(self.points):
            if p.top1 < self.top1 - max_drop - 1e-12:
                break
            best = p.cap
        return best

    def inert_below(self) -> float:
        """The lowest measured cap that changes nothing: the same FLOPs and top-1 as the highest cap (the
        model's own paths fit under it). Caps between it and the highest are no cut at all."""
        top = self.points[-1]
        lowest = top.cap
        for p in reversed(self.points):
            if abs(p.flops_ratio - top.flops_ratio) > 1e-6 * max(top.flops_ratio, 1e-12) or p.top1 != top.top1:
                break
            lowest = p.cap
        return lowest

    def top1_at(self, cap: float) -> float:
        """Top-1 expected at ``cap``: linear between measured caps, the highest point's above it (the curve
        is measured up to cap 1), the lowest point's below it (conservative: lower caps score less)."""
        caps = [p.cap for p in self.points]
        if cap >= caps[-1]:
            return self.points[-1].top1
        if cap <= caps[0]:
            return self.points[0].top1
        i = bisect.bisect_right(caps, cap)
        lo, hi = self.points[i - 1], self.points[i]
        t = (cap - lo.cap) / (hi.cap - lo.cap)
        return lo.top1 + t * (hi.top1 - lo.top1)


def curve_caps(own_ratio: float, fractions: Sequence[float] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5,
                                                                  0.4)) -> list[float]:
    """The caps a curve is measured at: fractions of the model's own FLOPs ratio, plus 1.0."""
    return sorted({round(min(1.0, own_ratio * f), 4) for f in fractions} | {1.0})
