"""SLO autopilot: trade accuracy for latency under load, through the compute budget of each request.

Every ``interval_s`` the controller looks at the latencies of requests answered since its last
decision and at the images queued in the replica. Over the SLO (p99 above ``high`` x SLO, or a
queue longer than ``max_queue`` images) it cuts the budget multiplicatively; comfortably under
(p99 below ``low`` x SLO, queue within ``max_queue``) it raises it additively, never above the baseline
(the model's own budget) nor below the floor. Multiplicative decrease, additive increase: it
sheds load fast and gives accuracy back carefully. Requests that name their own knob are left
alone. Pure logic, no Ray: the replica feeds it and reads ``budget``.

The budget is a cap on every image's FLOPs laid over the model's own rule (``capped``): a
``budget`` model's baseline is its knob; a model served under another rule (threshold, say) keeps
its own paths at the baseline of 1 and has its longest paths trimmed as the cap comes down.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

from gating.policies import Full, Policy, capped


@dataclass
class AutopilotConfig:
    slo_p99_ms: float  # the latency target
    min_budget: float  # floor: never serve below this fraction of backbone FLOPs
    baseline: float = 1.0  # ceiling: the budget served when there is no pressure
    interval_s: float = 0.25  # control period
    min_samples: int = 8  # fewer answered requests than this in a period: latency says nothing yet
    high: float = 0.8  # act on p99 above high x SLO (headroom for the next period's growth)
    low: float = 0.5  # give budget back when p99 is below low x SLO
    decrease: float = 0.7  # budget x this when over: from 0.6 to the floor in about a second
    increase: float = 0.025  # budget + this when under (about 0.1 a second)
    max_queue: int = 64  # queued images beyond which the budget drops whatever latency says
    horizon_s: float = 2.0  # latencies older than this are no evidence any more

    def __post_init__(self):
        if not self.slo_p99_ms > 0:
            raise ValueError(f"the SLO must be > 0 ms, got {self.slo_p99_ms}")
        if not 0 < self.min_budget <= self.baseline <= 1:
            raise ValueError(f"need 0 < min budget ({self.min_budget}) <= baseline ({self.baseline}) <= 1")


def baseline_budget(rule: Policy) -> float:
    """The cap served when there is no pressure: the rule's own (a ``budget`` model's knob), else 1,
    which leaves the rule's paths as they are."""
    return 1.0 if rule.cap is None else rule.cap


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class Autopilot:
    def __init__(self, cfg: AutopilotConfig, rule: Optional[Policy] = None):
        self.cfg = cfg
        self.rule = rule or Full()  # the model's own rule, served capped at ``budget``
        self.budget = cfg.baseline
        self._latencies: list[tuple[float, float]] = []  # (monotonic time answered, latency s)
        self._lock = threading.Lock()

    @classmethod
    def for_rule(cls, rule: Policy, slo_p99_ms: float, min_budget: float) -> "Autopilot":
        """An autopilot over ``rule``, from its own cost (``baseline_budget``) down to ``min_budget``
        (or the baseline, when that is lower)."""
        baseline = baseline_budget(rule)
        return cls(AutopilotConfig(slo_p99_ms, min(min_budget, baseline), baseline), rule)

    @property
    def policy(self) -> Policy:
        """What requests that name no knob of their own are served with now."""
        return capped(self.rule, self.budget)

    def observe(self, latency_s: float) -> None:
        """Record one answered request (called from the request path)."""
        with self._lock:
            self._latencies.append((time.monotonic(), latency_s))

    def step(self, queued_images: int) -> float:
        """One control decision; returns the budget to serve with until the next one."""
        since = time.monotonic() - self.cfg.horizon_s
        with self._lock:
            window, self._latencies = [(t, v) for t, v in self._latencies if t >= since], []
        cfg = self.cfg
        values = [v * 1e3 for _, v in window]  # ms
        enough = len(values) >= cfg.min_samples
        # too few answers for a p99 may hold the budget (the slowest is not fast), never cut it; they
        # stay as evidence, so a slow trickle of requests adds up to a p99 within the horizon
        latency = p99(values) if enough else max(values, default=0.0)
        if queued_images > cfg.max_queue or (enough and latency > cfg.high * cfg.slo_p99_ms):
            self.budget = max(cfg.min_budget, round(self.budget * cfg.decrease, 3))
            return self.budget  # the evidence was of the budget before: start afresh
        if latency < cfg.low * cfg.slo_p99_ms:  # (and the queue is not over max_queue)
            self.budget = min(cfg.baseline, round(self.budget + cfg.increase, 3))
        if not enough or latency >= cfg.low * cfg.slo_p99_ms:
            with self._lock:  # in the band, or too few answers yet: keep the evidence for the next period
                self._latencies = window + self._latencies
        return self.budget
