"""``skipserve bench autopilot``: a load step (low -> overload -> low), autopilot on vs a fixed deployment.

Two servers are run in turn with the same model and batching, one with ``--slo-p99-ms`` (and its
accuracy budget), one without, ``rounds`` times alternating; each phase's figures are medians over
the rounds. Each gets the same three closed-loop phases; clients that are shed
(503) wait as Retry-After asks, as a well-behaved client does. Per phase: the client-side p99 of
admitted requests (200s), 200s and 503s per second, and the mean cap the answers were served with
(each answer names its policy). ``expected_top1_drop_pp`` is the time-weighted top-1 drop of the caps
served, read off the checkpoint's cap curve; ``budget_recovery_s`` is how long after the load drops
the autopilot serves the baseline again (the first answer at the baseline after which every answer
is at it).
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
    min_budget: float = 0.25  # the hard floor; the accuracy budget usually sets a higher one
    max_accuracy_drop: float = 1.0  # percentage points of validation top-1 the autopilot may spend
    low_concurrency: int = 2
    high_concurrency: int = 16  # 8x the low load; x 16 images = the replica queue (256), so no 503s
    low_s: float = 15.0
    high_s: float = 30.0
    recover_s: float = 40.0  # the last low phase: long enough to see the budget come back
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    images_per_request: int = 16  # v2 requests of this many JPEGs: the model's cost, which the budget
    #                               controls, dominates (with 1 image the HTTP path does, see bench serving)
    rounds: int = 2  # fixed/autopilot pairs, alternating; each phase's figures are medians over the rounds
    cheap: bool = False  # serve cheap_checkpoint() instead: HTTP, not the model, is the bottleneck


def recovery_seconds(caps: list[tuple[float, float | None]], baseline: float) -> float | None:
    """Seconds into the phase from which every answer was served at ``baseline``; None if never."""
    at = None
    for t, cap in caps:
        if cap is None or abs(cap - baseline) > 1e-9:
            at = None
        elif at is None:
            at = t
    return at


def median_row(rows: list[dict]) -> dict:
    """One phase's figures over its rounds: the median of each number (None where any round had none)."""
    out = {k: v for k, v in rows[0].items() if k != "round"}
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "concurrency":
            values = [r[k] for r in rows]
            out[k] = None if None in values else statistics.median(values)
    return out


def time_weighted(caps: list[tuple[float, float | None]], seconds: float, value) -> float | None:
    """Mean of ``value(cap)`` over a phase of ``seconds``, each answer's cap holding until the next
    answer (the first from the phase's start); None without answers."""
    if not caps:
        return None
    total, prev_t = 0.0, 0.0
    for k, (t, cap) in enumerate(caps):
        end = caps[k + 1][0] if k + 1 < len(caps) else seconds
        total += value(cap) * (end - (prev_t if k else 0.0))
        prev_t = end
    return total / max(seconds, 1e-9)


def cheap_checkpoint(path) -> str:
    """A gated model that costs next to nothing to run, with a cap curve that says cuts cost no accuracy:
    if the autopilot cuts its cap, it is only because it mistook the HTTP path for the model. A CIFAR
    ResNet-20 with three units of 4, 8 and 16 channels (the others removed), random weights."""
    import torch

    from gating.backbones import ArchSpec, build_backbone
    from gating.capcurve import CapCurve, CapPoint
    from gating.gates import build_gate
    from gating.model import GatedModel
    from gating.policies import make_policy
    from gating.zoo import resolve_checkpoint

    card = GatedModel.load(resolve_checkpoint("default")).card
    torch.manual_seed(0)
    backbone = build_backbone(ArchSpec("resnet20", num_classes=len(card.class_names),
                                       inner_widths=(4, 0, 0, 8, 0, 0, 16, 0, 0)))
    gate = build_gate("resnet8", backbone, resolution=8, widths=(4, 8, 16))
    model = GatedModel(backbone, gate, make_policy("threshold", 0.0), card)
    curve = CapCurve(tuple(CapPoint(c, 0.1, c) for c in (0.25, 0.5, 1.0)), 0.1)
    model.card = type(card)(**{**vars(card), "info": {"cap_curve": curve.to_dict()}})
    model.save(path)
    return str(path)


def run(cfg: AutopilotBenchConfig) -> dict:
    from gating.capcurve import CapCurve
    from gating.model import GatedModel
    from gating.zoo import resolve_checkpoint
    from serving.settings import model_name_for
    from serving.autopilot import baseline_budget
    from serving.process import ServerProcess

    if cfg.cheap:
        cfg.checkpoint = cheap_checkpoint(tempfile.mktemp(prefix="skipserve-cheap-", suffix=".safetensors"))
    path = resolve_checkpoint(cfg.checkpoint)
    model = GatedModel.load(path)
    baseline = baseline_budget(model.policy)
    curve = CapCurve.of_card(model.card.info)
    own = None if curve is None else curve.top1

    def drop_pp(cap: float | None) -> float:  # None: the model's own rule, uncapped
        return 0.0 if curve is None or cap is None else 100 * (own - curve.top1_at(cap))

    images = request_images(ServingBenchConfig(data=cfg.data))
    if cfg.images_per_request > 1:
        bodies = [v2_body(images, cfg.images_per_request, k, None) for k in range(len(images))]
        route, ctype = f"/v2/models/{model_name_for(cfg.checkpoint)}/infer", "application/json"
    else:
        bodies, route, ctype = images, "/v1/predict", "image/jpeg"
    phases = [("low", cfg.low_concurrency, cfg.low_s), ("overload", cfg.high_concurrency, cfg.high_s),
              ("low-again", cfg.low_concurrency, cfg.recover_s)]
    runs, recoveries = [], []
    for round_, autopilot in ((r, a) for r in range(cfg.rounds) for a in (False, True)):
        args = ["--max-batch-size", str(cfg.max_batch_size), "--batch-wait-ms", str(cfg.batch_wait_ms)]
        if autopilot:
            args += ["--slo-p99-ms", str(cfg.slo_p99_ms), "--min-budget", str(cfg.min_budget),
                     "--max-accuracy-drop", str(cfg.max_accuracy_drop)]
        log = tempfile.mktemp(prefix=f"skipserve-bench-autopilot-{'on' if autopilot else 'off'}-", suffix=".log")
        with ServerProcess(path, *args, log=log) as server:
            url = server.url + route
            asyncio.run(closed_loop(url, bodies, cfg.low_concurrency, 3.0, {}, content_type=ctype))  # warm-up
            for name, concurrency, seconds in phases:
                result = asyncio.run(closed_loop(url, bodies, concurrency, seconds, {}, caps=True,
                                                 content_type=ctype, retry_after=True))
                summary = summarise([result])
                caps = [c for _, c in result["caps"] if c is not None]  # none: a fixed, uncapped rule
                statuses = result["statuses"]
                runs.append({"phase": name, "autopilot": autopilot, "round": round_, "concurrency": concurrency,
                             "admitted_p99_ms": summary["p99_ms"], "admitted_p50_ms": summary["p50_ms"],
                             "ok_per_s": statuses.get(200, 0) / result["seconds"],
                             "shed_per_s": statuses.get(503, 0) / result["seconds"],
                             "other_errors": sum(v for k, v in statuses.items() if k not in (200, 503)),
                             "cap_mean": statistics.fmean(caps) if caps else None,
                             "expected_top1_drop_pp": time_weighted(result["caps"], result["seconds"], drop_pp)})
                if autopilot and name == "low-again":
                    recoveries.append(recovery_seconds(result["caps"], baseline))
    rows = [median_row([r for r in runs if (r["phase"], r["autopilot"]) == key])
            for key in dict.fromkeys((r["phase"], r["autopilot"]) for r in runs)]
    recovery = None if None in recoveries or not recoveries else statistics.median(recoveries)
    by = {(r["phase"], r["autopilot"]): r for r in rows}
    on, off = by[("overload", True)], by[("overload", False)]
    seconds = {name: s for name, _, s in phases}
    drops = [(r["expected_top1_drop_pp"], seconds[r["phase"]]) for r in rows
             if r["autopilot"] and r["expected_top1_drop_pp"] is not None]
    return {"benchmark": "autopilot", "checkpoint": cfg.checkpoint, "slo_ms": cfg.slo_p99_ms,
            "max_accuracy_drop_pp": cfg.max_accuracy_drop, "cap_curve": None if curve is None else curve.to_dict(),
            "expected_top1_drop_pp": (sum(d * s for d, s in drops) / sum(s for _, s in drops)) if drops else None,
            "overload_expected_top1_drop_pp": on["expected_top1_drop_pp"],
            "baseline_budget": baseline, "min_budget": cfg.min_budget, "phases": rows, "runs": runs,
            "budget_recovery_s": recovery, "budget_recovery_s_runs": recoveries,
            "overload": {"admitted_p99_within_slo": on["admitted_p99_ms"] <= cfg.slo_p99_ms,
                         "admitted_p99_vs_fixed": on["admitted_p99_ms"] / off["admitted_p99_ms"],
                         "ok_per_s_vs_fixed": on["ok_per_s"] / off["ok_per_s"] if off["ok_per_s"] else None},
            "config": asdict(cfg), "machine": machine_info()}
