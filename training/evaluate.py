"""Evaluate a gated model: accuracy, executed FLOPs, paths, per-unit skip rates."""
from __future__ import annotations

from typing import Optional

import torch

from gating.capcurve import CapCurve, CapPoint, curve_caps
from gating.model import GatedModel
from gating.policies import Policy, capped
from training.data import ImageSet, batches, normalize


@torch.inference_mode()
def evaluate_gated(model: GatedModel, data: ImageSet, policy: Optional[Policy] = None, *,
                   batch_size: int = 250) -> dict:
    if len(data) == 0:
        raise ValueError("no images to evaluate (an empty split or folder)")
    model.eval()
    n, correct, correct_full = len(data), 0, 0
    flops, keeps = [], []
    for idx in batches(n, batch_size):
        x = normalize(data.images[idx], model.card.mean, model.card.std) if model.card else normalize(data.images[idx])
        y = data.labels[idx]
        out = model(x, policy)
        correct += (out.logits.argmax(1) == y).sum().item()
        correct_full += (model.backbone(x).argmax(1) == y).sum().item()
        flops.append(out.flops)
        keeps.append(out.keep)
    keep = torch.cat(keeps)
    reference = model.flops.reference  # the uncut backbone, every unit run
    used = policy or model.policy
    mean_flops = float(torch.cat(flops).mean())
    return {
        "n_images": n,
        "policy": used.to_dict(),
        "top1": correct / n,
        "top1_full": correct_full / n,  # every unit this model has, no gate
        "flops": mean_flops,  # executed per image, gate included
        "flops_ratio": mean_flops / reference,
        "gate_flops_ratio": (model.gate_flops / reference) if used.needs_scores else 0.0,
        "units_executed_mean": float(keep.sum(1).float().mean()),
        "distinct_paths": len({tuple(r) for r in keep.tolist()}),
        "per_unit_skip_rate": [round(v, 4) for v in (1 - keep.float().mean(0)).tolist()],
    }


def cap_curve(model: GatedModel, data: ImageSet, caps: Optional[list[float]] = None) -> CapCurve:
    """Top-1 of ``model``'s own rule under each FLOPs cap on ``data`` (``skipserve eval --cap``'s numbers);
    the caps default to fractions of the model's own FLOPs ratio (``curve_caps``)."""
    if model.gate is None:
        raise ValueError("a cap curve is of a gated model: a cap on a model without a gate has nothing to rank by")
    own = evaluate_gated(model, data)
    points = []
    for cap in caps or curve_caps(own["flops_ratio"]):
        r = evaluate_gated(model, data, capped(model.policy, cap))
        points.append(CapPoint(cap, r["top1"], round(r["flops_ratio"], 6)))
    return CapCurve(tuple(points), own["top1"])
