"""``skipserve bench autopilot``: a load step (low -> overload -> low), autopilot on vs fixed budget.

Two servers are run in turn with the same model and batching, one with ``--slo-p99-ms``, one
without. Each gets the same three closed-loop phases. Per phase we report the client-side p99
and the mean budget the answers were served with (each /v1/predict answer names its knob);
``budget_recovery_s`` is how long after the load drops the autopilot serves the baseline again
(the first answer at the baseline after which every answer is at it).
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
from dataclasses import asdict, dataclass

from benchmarks.common import machine_info
from benchmarks.serving import ServingBenchConfig, closed_loop, request_images, summarise, v2_body


@dataclass
class AutopilotBenchConfig:
    checkpoint: str = "default"
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    slo_p99_ms: float = 350.0  # pick it between the fixed deployment's overload p99 and the floor's
    min_budget: float = 0.25
    low_concurrency: int = 2
    high_concurrency: int = 16  # 8x the low load; x 16 images = the replica queue (256), so no 503s
    low_s: float = 15.0
    high_s: float = 30.0
    recover_s: float = 40.0  # the last low phase: long enough to see the budget come back
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    images_per_request: int = 16  # v2 requests of this many JPEGs: the model's cost, which the budget
    #                               controls, dominates (with 1 image the HTTP path does, see bench serving)


def recovery_seconds(caps: list[tuple[float, float | None]], baseline: float) -> float | None:
    """Seconds into the phase from which every answer was served at ``baseline``; None if never."""
    at = None
    for t, cap in caps:
        if cap is None or abs(cap - baseline) > 1e-9:
            at = None
        elif at is None:
            at = t
    return at


def run(cfg: AutopilotBenchConfig) -> dict:
    from gating.model import GatedModel
    from gating.zoo import resolve_checkpoint
    from serving.settings import model_name_for
    from serving.autopilot import baseline_budget
    from serving.process import ServerProcess

    path = resolve_checkpoint(cfg.checkpoint)
    baseline = baseline_budget(GatedModel.load(path).policy)
    images = request_images(ServingBenchConfig(data=cfg.data))
    if cfg.images_per_request > 1:
        bodies = [v2_body(images, cfg.images_per_request, k, None) for k in range(len(images))]
        route, ctype = f"/v2/models/{model_name_for(cfg.checkpoint)}/infer", "application/json"
    else:
        bodies, route, ctype = images, "/v1/predict", "image/jpeg"
    phases = [("low", cfg.low_concurrency, cfg.low_s), ("overload", cfg.high_concurrency, cfg.high_s),
              ("low-again", cfg.low_concurrency, cfg.recover_s)]
    rows, recovery = [], None
    for autopilot in (False, True):
        args = ["--max-batch-size", str(cfg.max_batch_size), "--batch-wait-ms", str(cfg.batch_wait_ms)]
        if autopilot:
            args += ["--slo-p99-ms", str(cfg.slo_p99_ms), "--min-budget", str(cfg.min_budget)]
        log = tempfile.mktemp(prefix=f"skipserve-bench-autopilot-{'on' if autopilot else 'off'}-", suffix=".log")
        with ServerProcess(path, *args, log=log) as server:
            url = server.url + route
            asyncio.run(closed_loop(url, bodies, cfg.low_concurrency, 3.0, {}, content_type=ctype))  # warm-up
            for name, concurrency, seconds in phases:
                result = asyncio.run(closed_loop(url, bodies, concurrency, seconds, {}, caps=True,
                                                 content_type=ctype))
                summary = summarise([result])
                caps = [c for _, c in result["caps"] if c is not None]  # none: a fixed, uncapped rule
                rows.append({"phase": name, "autopilot": autopilot, "concurrency": concurrency,
                             "p99_ms": summary["p99_ms"], "p50_ms": summary["p50_ms"],
                             "throughput_rps": summary["throughput_rps"], "errors": summary["errors"],
                             "budget_mean": statistics.fmean(caps) if caps else None})
                if autopilot and name == "low-again":
                    recovery = recovery_seconds(result["caps"], baseline)
    by = {(r["phase"], r["autopilot"]): r for r in rows}
    return {"benchmark": "autopilot", "checkpoint": cfg.checkpoint, "slo_ms": cfg.slo_p99_ms,
            "baseline_budget": baseline, "min_budget": cfg.min_budget, "phases": rows,
            "budget_recovery_s": recovery,
            "overload_p99_within_slo": {"autopilot": by[("overload", True)]["p99_ms"] <= cfg.slo_p99_ms,
                                        "fixed": by[("overload", False)]["p99_ms"] <= cfg.slo_p99_ms},
            "config": asdict(cfg), "machine": machine_info()}
