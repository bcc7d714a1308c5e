"""Prometheus metrics of a replica, through ``ray.serve.metrics``.

Ray exports application metrics on each node's metrics port with its namespace prefix
``ray_``: the counter ``skipserve_requests`` reaches Prometheus as
``ray_skipserve_requests_total``. ``deploy/prometheus/prometheus.yml`` renames
``ray_skipserve_*`` back to ``skipserve_*`` at scrape time, so dashboards and
``skipserve monitor`` use the names below whichever way they read them.

Compute saved over any window = 1 - rate(flops_executed) / rate(flops_full).
"""
from __future__ import annotations

# name -> what it counts; the Prometheus name adds "_total" to counters
NAMES = {
    "skipserve_requests": "HTTP requests by route and status code",
    "skipserve_images": "images inferred",
    "skipserve_unit_executed": "images that executed each residual unit",
    "skipserve_flops_executed": "FLOPs executed (backbone units run + gate)",
    "skipserve_flops_full": "FLOPs the full backbone would have executed for the same images",
    "skipserve_request_latency_seconds": "request latency inside the replica, body read to response",
    "skipserve_batch_size": "images per executed batch",
    "skipserve_budget": "compute budget the replica serves with now (fraction of backbone FLOPs)",
    "skipserve_expected_top1": "validation top-1 of what is served now, from the checkpoint's cap curve (NaN: unknown)",
    "skipserve_admit_limit": "images in flight the replica admits now; requests beyond it are shed with 503",
    "skipserve_units": "residual units in the served backbone (a unit no image ran has no executed series)",
}

KINDS = {"skipserve_request_latency_seconds": "histogram", "skipserve_batch_size": "histogram",
         "skipserve_budget": "gauge", "skipserve_units": "gauge", "skipserve_expected_top1": "gauge",
         "skipserve_admit_limit": "gauge"}  # the rest are counters
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def series_names() -> set[str]:
    """Every series name the server exports, as Prometheus sees it after the ``ray_`` prefix is dropped."""
    return {name + suffix for name in NAMES for suffix in SUFFIXES[KINDS.get(name, "counter")]}


LATENCY_BOUNDS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    def __init__(self, model: str, num_units: int):
        from ray.serve import metrics  # only inside a replica: monitor and tests read the names above without Ray

        self.model = model
        self.requests = metrics.Counter("skipserve_requests", NAMES["skipserve_requests"],
                                        tag_keys=("model", "route", "status"))
        self.images = metrics.Counter("skipserve_images", NAMES["skipserve_images"], tag_keys=("model",))
        self.unit_executed = metrics.Counter("skipserve_unit_executed", NAMES["skipserve_unit_executed"],
                                             tag_keys=("model", "unit"))
        self.flops_executed = metrics.Counter("skipserve_flops_executed", NAMES["skipserve_flops_executed"],
                                              tag_keys=("model",))
        self.flops_full = metrics.Counter("skipserve_flops_full", NAMES["skipserve_flops_full"], tag_keys=("model",))
        self.latency = metrics.Histogram("skipserve_request_latency_seconds",
                                         NAMES["skipserve_request_latency_seconds"],
                                         boundaries=LATENCY_BOUNDS, tag_keys=("model", "route"))
        self.batch_size = metrics.Histogram("skipserve_batch_size", NAMES["skipserve_batch_size"],
                                            boundaries=BATCH_BOUNDS, tag_keys=("model",))
        self.budget = metrics.Gauge("skipserve_budget", NAMES["skipserve_budget"], tag_keys=("model",))
        self.units = metrics.Gauge("skipserve_units", NAMES["skipserve_units"], tag_keys=("model",))
        self.expected_top1 = metrics.Gauge("skipserve_expected_top1", NAMES["skipserve_expected_top1"],
                                           tag_keys=("model",))
        self.admit_limit = metrics.Gauge("skipserve_admit_limit", NAMES["skipserve_admit_limit"], tag_keys=("model",))
        for m in (self.requests, self.images, self.unit_executed, self.flops_executed, self.flops_full,
                  self.latency, self.batch_size, self.budget, self.units, self.expected_top1, self.admit_limit):
            m.set_default_tags({"model": model})  # a fresh dict: Ray adds its own tags to it in place
        self.units.set(num_units)
        self._unit_tags = [{"unit": str(i)} for i in range(num_units)]

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def batch(self, images: int, unit_counts: list[int], flops_executed: float, flops_full: float) -> None:
        self.batch_size.observe(images)
        self.images.inc(images)
        for tags, count in zip(self._unit_tags, unit_counts):
            if count:
                self.unit_executed.inc(count, tags=tags)
        self.flops_executed.inc(flops_executed)
        self.flops_full.inc(flops_full)
