"""``skipserve bench accuracy``: validation top-1 against executed FLOPs, over each rule's knob.

Curves for: every gate kind (trained by S4 on the same backbone and labels), under every
decision rule over its knob; random skipping (random scores under the budget rule: the same
per-image skip counts, chosen blindly), the baseline any gate must beat; and optionally the
shipped model after S5, with its static path: for k = 1..n, the k units its gate keeps most often
on training images, run for every image with no gate. That is what cutting units once would serve
with the same weights; where the gated curve is below it, the per-image choice buys nothing. FLOPs
are executed FLOPs per image including the gate (and a second pass where an inline gate serves a
rule that needs every score), over the full backbone's.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from benchmarks.common import machine_info

KNOBS = {  # rule -> knob grid (greedy: units skipped; threshold/softmax: alpha; budget: FLOPs fraction)
    "budget": (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0),
    "greedy": (2, 4, 6, 8, 10),
    "threshold": (-0.3, -0.1, -0.05, -0.02, -0.01, 0.0),
    "softmax": (0.05, 0.07, 0.09, 0.12),
}


@dataclass
class AccuracyBenchConfig:
    backbone: str = "default-backbone"  # the S1 backbone the gates are trained on
    labels: str = ""  # S3 labels of the backbone on the training split ("" = compute them)
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    gates: tuple[str, ...] = ("resnet8", "lstm", "mlp")
    gate_epochs: int = 5
    rules: tuple[str, ...] = ("budget", "greedy", "threshold", "softmax")
    extra_models: dict = field(default_factory=lambda: {"default (after S5)": "default"})
    val_images: Optional[int] = None  # evaluate on N validation images drawn with seed 0 (None = all)
    static_rank_images: int = 5000  # training images (seed 0) whose gate decisions rank units for the static path
    run_dir: str = "out/bench-accuracy"


@torch.inference_mode()
def point(model, x: torch.Tensor, y: torch.Tensor, policy, *, random_scores: bool = False,
          batch_size: int = 500, seed: int = 0) -> dict:
    from gating.executor import execute

    g = torch.Generator().manual_seed(seed)
    correct, flops, units = 0, 0.0, 0.0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        if random_scores:
            keep = policy.decide(torch.rand(len(xb), model.num_units, generator=g), model.flops)
            logits, f = execute(model.backbone, xb, keep), model.flops.executed(keep)
        else:
            out = model(xb, policy)
            logits, keep, f = out.logits, out.keep, out.flops
        correct += (logits.argmax(1) == yb).sum().item()
        flops += float(f.sum())
        units += float(keep.sum())
    n = len(x)
    return {"knob": policy.knob, "top1": correct / n, "flops_ratio": flops / n / model.flops.reference,
            "units_executed_mean": units / n}


@torch.inference_mode()
def static_curve(model, train_x: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                 batch_size: int = 500) -> list[dict]:
    """Top-1 of ``model``'s weights on one fixed path per k (knob = k units kept), the units ranked by
    how often its gate keeps them on ``train_x``; no gate runs, so none is counted."""
    from gating.executor import execute

    keep = torch.cat([model.decide(b) for b in train_x.split(batch_size)])  # (N, n)
    ranked = torch.sort(keep.float().mean(0), descending=True, stable=True).indices
    points = []
    for k in range(1, model.num_units + 1):
        path = torch.zeros(model.num_units, dtype=torch.bool)
        path[ranked[:k]] = True
        correct = sum((execute(model.backbone, xb, path.expand(len(xb), -1)).argmax(1) == yb).sum().item()
                      for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
        points.append({"knob": k, "top1": correct / len(x),
                       "flops_ratio": float(model.flops.executed(path[None])[0]) / model.flops.reference,
                       "units_executed_mean": float(k)})
    return points


def curve(model, x, y, rule: str, **kw) -> list[dict]:
    from gating.policies import make_policy

    points = []
    for knob in KNOBS[rule]:
        if rule == "greedy" and knob > model.num_units:
            continue
        points.append(point(model, x, y, make_policy(rule, knob), **kw))
    return points


def run(cfg: AccuracyBenchConfig) -> dict:
    from gating.gates import GATES
    from gating.model import GatedModel
    from gating.policies import make_policy
    from gating.preprocess import normalize
    from gating.zoo import resolve_checkpoint
    from training.backbone import BackboneConfig, load_split
    from training.data import card_split
    from training.gate import GateConfig, train_gate
    from training.labels import LabelConfig, label_dataset, load_labels

    for kind in cfg.gates:  # an unknown kind fails here, not after the labels and the gates before it
        GATES.get(kind)
    torch.manual_seed(0)
    base = GatedModel.load(resolve_checkpoint(cfg.backbone))
    fraction, split_seed = card_split(base.card)  # the backbone's own split: no gate sees its validation images
    train, val = load_split(BackboneConfig(data=cfg.data, val_fraction=fraction, split_seed=split_seed))
    if cfg.val_images:
        val = val.sample(cfg.val_images, seed=0)
    x, y = normalize(val.images, base.card.mean, base.card.std), val.labels
    if not cfg.gates:
        imp = None  # no gate to train: no labels to compute
    elif cfg.labels:
        imp = load_labels(cfg.labels, num_images=len(train), num_units=base.num_units)
    else:
        imp = label_dataset(base.backbone, train, LabelConfig())
    full_top1 = point(base, x, y, make_policy("full"))["top1"]
    series = []
    random_model = GatedModel(base.backbone, None, base.policy, base.card)
    series.append({"name": "random skipping", "gate": None, "rule": "budget",
                   "points": curve(random_model, x, y, "budget", random_scores=True)})
    for kind in cfg.gates:
        t0 = time.perf_counter()
        model = GatedModel.load(resolve_checkpoint(cfg.backbone))
        model = train_gate(model, train, imp, GateConfig(kind=kind, epochs=cfg.gate_epochs), f"{cfg.run_dir}/{kind}")
        model.eval()
        train_s = time.perf_counter() - t0
        for rule in cfg.rules:
            series.append({"name": f"{kind} gate, {rule}", "gate": kind, "rule": rule, "gate_train_s": train_s,
                           "points": curve(model, x, y, rule)})
    train_x = None
    for label, ckpt in cfg.extra_models.items():
        model = GatedModel.load(resolve_checkpoint(ckpt))
        series.append({"name": label, "gate": model.gate.kind if model.gate else None, "rule": "budget",
                       "points": curve(model, x, y, "budget")})
        if model.gate is not None:
            if train_x is None:  # training images rank the units: the validation split only scores them
                sample = train.sample(min(cfg.static_rank_images, len(train)), seed=0)
                train_x = normalize(sample.images, base.card.mean, base.card.std)
            series.append({"name": f"{label}: static path", "gate": None, "rule": "static", "static_of": label,
                           "points": static_curve(model, train_x, x, y)})
    return {"benchmark": "accuracy", "backbone": cfg.backbone, "backbone_top1": full_top1, "val_images": len(val),
            "series": series, "config": asdict(cfg), "machine": machine_info()}
