"""``skipserve monitor``: compute saved, per-unit skip rates, requests/s and p99, in the terminal.

Two sources, the same figures:
- ``--prometheus URL``: a Prometheus server's query API (it scrapes the server, see
  deploy/prometheus/prometheus.yml); rates over its last minute;
- ``--metrics URL``: Ray's metrics endpoint read directly; rates from two reads ``window_s`` apart.
``compute_saved`` is since the server started (1 - FLOPs executed / FLOPs of the full backbone);
``compute_saved_window`` the same over the rate window. Imports no Ray.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Report:
    source: str
    images: float = 0.0  # images served since start
    compute_saved: Optional[float] = None  # since start; None before any traffic
    compute_saved_window: Optional[float] = None  # over the rate window; None when idle
    requests_per_s: float = 0.0
    p99_ms: Optional[float] = None  # over the rate window
    budget: Optional[float] = None  # the per-image FLOPs cap served now (budget rule, autopilot), of full FLOPs
    expected_top1: Optional[float] = None  # validation top-1 at that cap (the cap curve); None: unknown
    shed_share: Optional[float] = None  # share of requests answered 503 over the rate window; None when idle
    per_unit_skip_rate: list[float] = field(default_factory=list)  # since start, unit 0 first


def _get(url: str, timeout: float = 10.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"cannot read {url}: {getattr(err, 'reason', err)}") from None


# ---------------------------------------------------------------- raw metrics endpoint
GAUGES = ("skipserve_budget", "skipserve_units", "skipserve_expected_top1", "skipserve_admit_limit")  # a value per replica: kept apart (and averaged), never summed


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(series name without Ray's ``ray_`` prefix, sorted label pairs): value}: counters summed over
    replicas (and Ray's other labels), gauges kept per replica."""
    from prometheus_client.parser import text_string_to_metric_families

    return parse_scrape(_get(url).decode(), text_string_to_metric_families)


def parse_scrape(text: str, families) -> dict[tuple[str, tuple], float]:
    out: dict[tuple[str, tuple], float] = {}
    for family in families(text):
        for s in family.samples:
            name = s.name.removeprefix("ray_")
            if not name.startswith("skipserve_"):
                continue
            keep = (lambda k: True) if name in GAUGES else (lambda k: k in ("model", "route", "status", "unit", "le"))
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if keep(k)))
            out[(name, labels)] = out.get((name, labels), 0.0) + s.value
    return out


def total(values: dict, name: str, **want) -> float:
    """Sum of the series ``name`` whose labels include ``want``."""
    return sum(v for (n, ls), v in values.items() if n == name and set(want.items()) <= set(ls))


def _by(values: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in values.items():
        if n == name:
            key = dict(ls).get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + v
    return out


def quantile_from_buckets(buckets: dict[str, float], q: float) -> Optional[float]:
    """Prometheus' histogram_quantile over cumulative ``{le: count}``."""
    items = sorted(((math.inf if le == "+Inf" else float(le)), c) for le, c in buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return prev_le


def report_from_scrapes(first: dict, second: dict, seconds: float, source: str) -> Report:
    r = Report(source=source)
    r.images = total(second, "skipserve_images_total")
    full, executed = total(second, "skipserve_flops_full_total"), total(second, "skipserve_flops_executed_total")
    r.compute_saved = 1 - executed / full if full else None
    d_full = full - total(first, "skipserve_flops_full_total")
    d_exec = executed - total(first, "skipserve_flops_executed_total")
    r.compute_saved_window = 1 - d_exec / d_full if d_full > 0 else None
    d_requests = total(second, "skipserve_requests_total") - total(first, "skipserve_requests_total")
    r.requests_per_s = d_requests / seconds
    d_shed = total(second, "skipserve_requests_total", status="503") - total(first, "skipserve_requests_total",
                                                                            status="503")
    r.shed_share = d_shed / d_requests if d_requests > 0 else None
    b2, b1 = _by(second, "skipserve_request_latency_seconds_bucket", "le"), \
        _by(first, "skipserve_request_latency_seconds_bucket", "le")
    p99 = quantile_from_buckets({le: c - b1.get(le, 0.0) for le, c in b2.items()}, 0.99)
    r.p99_ms = None if p99 is None else p99 * 1e3
    budgets = [v for (n, _), v in second.items() if n == "skipserve_budget" and not math.isnan(v)]  # NaN: uncapped
    r.budget = sum(budgets) / len(budgets) if budgets else None
    expected = [v for (n, _), v in second.items() if n == "skipserve_expected_top1" and not math.isnan(v)]
    r.expected_top1 = sum(expected) / len(expected) if expected else None
    units = _by(second, "skipserve_unit_executed_total", "unit")
    if r.images:
        # a unit no image ran exports no series: the units gauge says how many there are
        declared = [int(v) for (name, _), v in second.items() if name == "skipserve_units" and not math.isnan(v)]
        n = max([int(u) + 1 for u in units] + declared, default=0)
        r.per_unit_skip_rate = [1 - units.get(str(i), 0.0) / r.images for i in range(n)]
    return r


def from_metrics(url: str, window_s: float = 2.0, previous: Optional[tuple[float, dict]] = None) -> tuple[Report, tuple]:
    """A report from Ray's endpoint; pass the returned state back as ``previous`` to rate over the gap."""
    if previous is None:
        previous = (time.monotonic(), scrape(url))
        time.sleep(window_s)
    now, values = time.monotonic(), scrape(url)
    return report_from_scrapes(previous[1], values, now - previous[0], url), (now, values)


# ---------------------------------------------------------------- Prometheus query API
def promql(base: str, query: str) -> list[dict]:
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(_get(url))
    if body.get("status") != "success":
        raise ValueError(f"Prometheus query failed: {body.get('error', body)}")
    return body["data"]["result"]


def _scalar(base: str, query: str) -> Optional[float]:
    result = promql(base, query)
    if not result:
        return None
    v = float(result[0]["value"][1])
    return None if math.isnan(v) or math.isinf(v) else v


def from_prometheus(base: str, window: str = "1m") -> Report:
    r = Report(source=base)
    r.images = _scalar(base, "sum(skipserve_images_total)") or 0.0
    r.compute_saved = _scalar(base, "1 - sum(skipserve_flops_executed_total) / sum(skipserve_flops_full_total)")
    r.compute_saved_window = _scalar(base, f"1 - sum(rate(skipserve_flops_executed_total[{window}])) / "
                                           f"sum(rate(skipserve_flops_full_total[{window}]))")
    r.requests_per_s = _scalar(base, f"sum(rate(skipserve_requests_total[{window}]))") or 0.0
    p99 = _scalar(base, f"histogram_quantile(0.99, sum by (le) (rate(skipserve_request_latency_seconds_bucket[{window}])))")
    r.p99_ms = None if p99 is None else p99 * 1e3
    r.budget = _scalar(base, "avg(skipserve_budget)")
    r.expected_top1 = _scalar(base, "avg(skipserve_expected_top1)")
    r.shed_share = _scalar(base, f'sum(rate(skipserve_requests_total{{status="503"}}[{window}])) / '
                                 f"sum(rate(skipserve_requests_total[{window}]))")
    if r.images:
        rows = promql(base, "sum by (unit) (skipserve_unit_executed_total)")
        executed = {int(row["metric"]["unit"]): float(row["value"][1]) for row in rows}
        declared = _scalar(base, "max(skipserve_units)")
        n = max(max(executed, default=-1) + 1, int(declared or 0))
        r.per_unit_skip_rate = [1 - executed.get(i, 0.0) / r.images for i in range(n)]
    return r


# ---------------------------------------------------------------- rendering
def _pct(v: Optional[float]) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def render(r: Report) -> str:
    lines = [f"skipserve monitor  {r.source}",
             f"compute saved   {_pct(r.compute_saved)} since start, {_pct(r.compute_saved_window)} recently"
             f"   ({r.images:.0f} images)",
             f"requests/s      {r.requests_per_s:8.1f}     p99 "
             + ("   -" if r.p99_ms is None else f"{r.p99_ms:7.1f} ms")
             + ("" if r.budget is None else f"     budget {r.budget:.2f} of full FLOPs"),
             f"expected top-1  {_pct(r.expected_top1)} (cap curve)   shed {_pct(r.shed_share)} of requests (503)",
             "per-unit skip rate:"]
    for i, rate in enumerate(r.per_unit_skip_rate):
        lines.append(f"  unit {i:>3} {_pct(rate)} {'#' * round(40 * max(0.0, min(1.0, rate)))}")
    if not r.per_unit_skip_rate:
        lines.append("  (no images served yet)")
    return "\n".join(lines)


def as_json(r: Report) -> str:
    return json.dumps(asdict(r), indent=2)
