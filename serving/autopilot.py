"""SLO autopilot: hold a p99 latency target by trading accuracy, within a budget, and then load.

Every ``interval_s`` the controller reads what the replica saw since its last decision: the latencies
of the requests it answered, the images queued and answered, and how busy the model was (the share
of the period its process spent computing batches). Two levers, in this order:

1. **The cap** on every image's FLOPs, laid over the model's own rule (``capped``). It is cut
   multiplicatively when p99 is over ``high`` x SLO, but only when the model is the bottleneck (busy
   at least ``busy`` of the time) and never below the floor: the lowest cap whose validation top-1
   (the checkpoint's cap curve) is within ``max_accuracy_drop`` of the model's own, nor below
   ``min_budget``. A cut is judged ``judge_periods`` later: if p99 did not fall by ``min_gain`` it is
   undone, and the cap holds for ``cooldown_s``. A model without a cap curve keeps its cap: nothing
   says what a cut would cost.
2. **Admission.** Requests beyond ``admit_limit`` images in flight are answered 503 with Retry-After
   before any work, so that admitted ones meet the SLO. The limit is what the model serves within
   ``admit_target`` x the SLO at its measured capacity (images per second it is busy: Little's law,
   which catches a load step before latency shows it), and over the SLO with the cap at its floor (or
   the model not the bottleneck, or a cut that did not help) it is cut further, ×``decrease``.

Under ``low`` x SLO it gives back in the opposite order: admission first (shedding a request costs
more than a point of accuracy), then the cap, additively, up to the baseline (the model's own rule).
Pure logic, no Ray: the replica feeds it and reads ``budget`` and ``admit_limit``.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

from gating.capcurve import CapCurve
from gating.policies import Full, Policy, capped


@dataclass
class AutopilotConfig:
    slo_p99_ms: float  # the latency target
    min_budget: float  # hard floor: never serve below this fraction of backbone FLOPs
    baseline: float = 1.0  # ceiling: the cap served when there is no pressure
    floor: float = 0.0  # the accuracy floor (the cap curve's); 0: none beyond min_budget
    inert: float = 1.0  # caps from this one up change nothing (the rule's own paths fit under it)
    interval_s: float = 0.25  # control period
    min_samples: int = 8  # fewer answered requests than this in a period: latency says nothing yet
    high: float = 0.8  # act on p99 above high x SLO (headroom for the next period's growth)
    low: float = 0.5  # give back when p99 is below low x SLO
    decrease: float = 0.7  # cap (and admission limit) x this when over
    increase: float = 0.025  # cap + this when under (about 0.1 a second)
    max_queue: int = 64  # queued images beyond which the model is behind whatever latency says
    horizon_s: float = 2.0  # latencies older than this are no evidence any more
    busy: float = 0.8  # the model is the bottleneck when a batch ran at least this share of the period
    judge_periods: int = 4  # a cut is judged this many periods after it was made
    min_gain: float = 0.05  # ... and undone unless p99 fell by at least this share
    cooldown_s: float = 5.0  # after a cut was undone, the cap holds this long
    admit_target: float = 0.3  # admission sized so that in-flight images / capacity = this x the SLO
    admit_wait: float = 0.15  # a request over the limit waits up to this x the SLO for a slot, then is shed
    min_admit: int = 1  # the admission limit never goes below this many images in flight
    max_admit: int = 256  # the replica's own queue limit: admission at this is no shedding

    def __post_init__(self):
        if not self.slo_p99_ms > 0:
            raise ValueError(f"the SLO must be > 0 ms, got {self.slo_p99_ms}")
        if not 0 < self.min_budget <= self.baseline <= 1:
            raise ValueError(f"need 0 < min budget ({self.min_budget}) <= baseline ({self.baseline}) <= 1")
        if not 1 <= self.min_admit <= self.max_admit:
            raise ValueError(f"need 1 <= min_admit ({self.min_admit}) <= max_admit ({self.max_admit})")

    @property
    def lowest(self) -> float:
        """The lowest cap it may serve: the accuracy floor, never under min_budget nor over the baseline."""
        return min(self.baseline, max(self.min_budget, self.floor))


def baseline_budget(rule: Policy) -> float:
    """The cap served when there is no pressure: the rule's own (a ``budget`` model's knob), else 1,
    which leaves the rule's paths as they are."""
    return 1.0 if rule.cap is None else rule.cap


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class Autopilot:
    def __init__(self, cfg: AutopilotConfig, rule: Optional[Policy] = None, curve: Optional[CapCurve] = None):
        self.cfg = cfg
        self.rule = rule or Full()  # the model's own rule, served capped at ``budget``
        self.curve = curve
        self.budget = cfg.baseline
        self.backoff = cfg.max_admit  # the admission limit latency has set (cut when late, raised when fast)
        self._latencies: list[tuple[float, float]] = []  # (monotonic time answered, latency s)
        self._images, self._last_step = 0, time.monotonic()  # images answered since the last step
        self.capacity = 0.0  # images the model answers per second it is busy, smoothed
        self.throughput: Optional[float] = None  # images answered per second of wall time, smoothed
        self._lock = threading.Lock()
        self._cut: Optional[tuple[float, float, int]] = None  # (cap before, p99 before, periods since)
        self._hold_until = 0.0  # monotonic time before which the cap does not move down
        self._since_shrink = cfg.judge_periods  # periods since admission was last tightened

    @classmethod
    def for_rule(cls, rule: Policy, slo_p99_ms: float, min_budget: float, *, curve: Optional[CapCurve] = None,
                 max_accuracy_drop_pp: float = 1.0, max_admit: int = 256) -> "Autopilot":
        """An autopilot over ``rule``, from its own cost (``baseline_budget``) down to the lowest cap
        ``curve`` allows within ``max_accuracy_drop_pp`` points of top-1, and never below ``min_budget``."""
        baseline = baseline_budget(rule)
        floor = None if curve is None else curve.floor(max_accuracy_drop_pp / 100)
        cfg = AutopilotConfig(slo_p99_ms, min(min_budget, baseline), baseline,
                              floor=baseline if floor is None else floor,
                              inert=baseline if curve is None else min(baseline, curve.inert_below()),
                              max_admit=max_admit)
        return cls(cfg, rule, curve)

    @property
    def policy(self) -> Policy:
        """What requests that name no knob of their own are served with now."""
        return capped(self.rule, self.budget)

    @property
    def expected_top1(self) -> Optional[float]:
        """Validation top-1 at the cap served now, from the cap curve; None without one."""
        return None if self.curve is None else self.curve.top1_at(self.budget)

    @property
    def admit_limit(self) -> int:
        """Images in flight beyond which a request is shed: what the model serves within ``admit_target``
        x the SLO (Little's law on its measured capacity), and no more than latency has allowed."""
        cfg = self.cfg
        limit = self.backoff
        if self.capacity > 0:
            limit = min(limit, math.floor(self.capacity * cfg.slo_p99_ms / 1e3 * cfg.admit_target))
        return max(cfg.min_admit, limit)

    @property
    def shedding(self) -> bool:
        return self.admit_limit < self.cfg.max_admit

    def observe(self, latency_s: float) -> None:
        """Record one answered request (called from the request path)."""
        with self._lock:
            self._latencies.append((time.monotonic(), latency_s))

    def served(self, images: int) -> None:
        """Count images the model answered (its capacity, which admission is sized by)."""
        with self._lock:
            self._images += images

    def step(self, queued_images: int, model_busy: float = 1.0) -> float:
        """One control decision from the images queued now and the share of the period the model was
        executing; returns the cap to serve with until the next one."""
        now = time.monotonic()
        with self._lock:
            window, self._latencies = [(t, v) for t, v in self._latencies if t >= now - self.cfg.horizon_s], []
            images, self._images = self._images, 0
        dt = max(now - self._last_step, 1e-9)
        busy_s = model_busy * dt
        self._last_step = now
        rate = images / dt
        self.throughput = rate if self.throughput is None else 0.5 * (self.throughput + rate)
        if images and busy_s > 0.05 * self.cfg.interval_s:  # enough work in the period to say
            rate = images / busy_s
            self.capacity = rate if self.capacity == 0 else 0.5 * (self.capacity + rate)
        cfg = self.cfg
        values = [v * 1e3 for _, v in window]  # ms
        enough = len(values) >= cfg.min_samples
        # too few answers for a p99 may hold the cap (the slowest is not fast), never cut it; they stay
        # as evidence, so that a slow trickle of requests adds up to a p99 within the horizon
        latency = p99(values) if enough else max(values, default=0.0)
        fresh = self._judge(latency if enough else None, now)
        self._since_shrink += 1
        late = enough and latency > cfg.high * cfg.slo_p99_ms
        if queued_images > cfg.max_queue and self.throughput:
            # a load step: the queue predicts the latency (Little's law) before any answer shows it
            late = late or queued_images / self.throughput * 1e3 > cfg.high * cfg.slo_p99_ms
        if queued_images > cfg.max_queue or late:
            model_bound = model_busy >= cfg.busy
            effective = min(self.budget, cfg.inert)  # the cap that bites now
            if model_bound and effective > cfg.lowest + 1e-9 and now >= self._hold_until and self._cut is None:
                self._cut = (self.budget, latency, 0)
                self.budget = max(cfg.lowest, round(effective * cfg.decrease, 3))
            elif late and (self._cut is None or not model_bound) and self._since_shrink >= cfg.judge_periods:
                # nothing (more) to gain from the cap: admit fewer at a time, at most what the replica
                # answers within admit_target x the SLO (Little's law on its throughput: the whole path's
                # capacity when the model is not the bottleneck), judged as a cut is (latency answers a
                # change about one SLO later), so that the limit does not overshoot
                limit = min(self.admit_limit, queued_images + 1) * cfg.decrease
                if self.throughput:
                    limit = min(limit, self.throughput * cfg.slo_p99_ms / 1e3 * cfg.admit_target)
                self.backoff = max(cfg.min_admit, math.floor(limit))
                self._since_shrink = 0
            fresh = True  # the evidence was of the settings before: start afresh
        elif latency < cfg.low * cfg.slo_p99_ms:  # give back: admission first, then the cap
            if self.backoff < cfg.max_admit:
                self.backoff = min(cfg.max_admit, max(self.backoff + 1, math.ceil(self.backoff * 1.5)))
            elif self._cut is None:
                raised = round(self.budget + cfg.increase, 3)
                self.budget = cfg.baseline if raised >= min(cfg.inert, cfg.baseline) else raised  # no-op caps skipped
        if not fresh and (not enough or latency >= cfg.low * cfg.slo_p99_ms):
            with self._lock:  # in the band, or too few answers yet: keep the evidence for the next period
                self._latencies = window + self._latencies
        return self.budget

    def _judge(self, latency: Optional[float], now: float) -> bool:
        """Judge the last cut once ``judge_periods`` have passed: undone unless p99 fell by ``min_gain``.
        True when it was judged (the evidence since is of the settings after)."""
        if self._cut is None:
            return False
        before, p99_before, periods = self._cut
        periods += 1
        if periods < self.cfg.judge_periods or latency is None:
            self._cut = (before, p99_before, periods)
            return False
        self._cut = None
        if latency > p99_before * (1 - self.cfg.min_gain):  # it did not lower latency: undo it
            self.budget = before
            self._hold_until = now + self.cfg.cooldown_s
        return True
