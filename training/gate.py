"""S4: train the gate G on importance labels, backbone M fixed.

sigmoid(G(x)_i) is the probability that unit i stays open. Objectives:
- ``reward`` (the patent's): maximise sum_i sigmoid(G(x)_i) * (imp(x,i) - price * cost_i) by gradient ascent;
- ``reinforce``: sample open/closed decisions a ~ Bernoulli(sigmoid(G)), reward
  R = sum_i a_i (imp(x,i) - price * cost_i), ascend (R - mean R) * grad log p(a);
- ``regression``: fit G(x)_i to imp(x,i) (Huber loss), so threshold alpha reads as an importance level.
cost_i is unit i's FLOPs saving relative to the mean unit's, so ``price`` is in loss units per average unit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gating.backbones import ResidualBackbone
from gating.gates import Gate, build_gate
from gating.model import GatedModel
from training.data import ImageSet, normalize
from training.loop import BatchResult, Loop, train_epochs
from training.run import RunDir

OBJECTIVES = ("reward", "reinforce", "regression")


@dataclass
class GateConfig:
    kind: str = "resnet8"  # resnet8 | lstm | mlp
    # keyword arguments of the gate class: {resolution: 16} runs resnet8 on a 16x16 average-pooled
    # image (a quarter of its FLOPs), {hidden: 64} widens lstm/mlp
    hyper: dict = field(default_factory=dict)
    # one of OBJECTIVES. "regression" is the default: its scores rank units by predicted importance,
    # which greedy, softmax and budget need; "reward" and "reinforce" learn only which side of the
    # price a unit falls (saturated sigmoids), which suits the threshold rule alone.
    objective: str = "regression"
    price: float = 0.0  # lambda: the price of one average unit's compute, in loss units
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3  # Adam's peak learning rate, in a one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0


def objective_loss(scores: torch.Tensor, imp: torch.Tensor, cost: torch.Tensor, cfg: GateConfig,
                   g: torch.Generator | None = None) -> torch.Tensor:
    """Loss to minimise for (B, n) scores and labels; ``cost`` (n,) relative unit cost."""
    value = imp - cfg.price * cost  # (B, n) what keeping each unit is worth
    if cfg.objective == "reward":
        return -(torch.sigmoid(scores) * value).sum(1).mean()
    if cfg.objective == "reinforce":
        p = torch.sigmoid(scores)
        a = (torch.rand(p.shape, generator=g) < p.detach().cpu()).to(p.dtype).to(p.device)
        reward = (a * value).sum(1)
        advantage = reward - reward.mean()
        log_p = (a * F.logsigmoid(scores) + (1 - a) * F.logsigmoid(-scores)).sum(1)
        return -(advantage.detach() * log_p).mean()
    if cfg.objective == "regression":
        return F.huber_loss(scores, imp, delta=1.0)
    raise ValueError(f"unknown gate objective {cfg.objective!r}; use one of {OBJECTIVES}")


def gate_scores(model: GatedModel, x: torch.Tensor) -> torch.Tensor:
    """Scores with the backbone frozen: inline gates read the full path's unit inputs."""
    if model.gate.upfront:
        return model.gate(x)
    with torch.no_grad():
        features, _ = model.backbone.unit_inputs(x)
    return model.gate.score_features(features)


def make_gate(cfg: GateConfig, backbone: ResidualBackbone) -> Gate:
    """A new, untrained gate for ``backbone``, after checking the rest of ``cfg`` (the pipeline calls
    this on a throwaway backbone before S1, so a bad [gate] section fails in seconds, not after S3)."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown gate objective {cfg.objective!r}; use one of {OBJECTIVES}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"gate epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if not isinstance(cfg.hyper, dict):
        raise ValueError(f"gate hyper must be a mapping of the gate's keyword arguments, got {cfg.hyper!r}")
    try:
        gate = build_gate(cfg.kind, backbone, **cfg.hyper)
    except TypeError as err:
        raise ValueError(f"gate hyper {cfg.hyper} does not fit a {cfg.kind} gate: {err}") from err
    return gate


def one_cycle(step: int, total: int, peak: float, pct_start: float = 0.1) -> dict:
    """Adam's settings at ``step`` of ``total`` under torch's OneCycleLR (its defaults, computed as it does):
    the learning rate rises from peak / 25 to ``peak`` over the first ``pct_start`` of the steps, then
    falls to peak / 25e4 (cosine annealing), while beta1 falls from 0.95 to 0.85 and rises back. A rise
    of no length (``warm_end`` 0, where OneCycleLR divides by zero) starts at the peak."""
    start_lr, min_lr = peak / 25.0, peak / 25.0 / 1e4
    warm_end = float(pct_start * total) - 1  # the step at the peak
    if 0 < warm_end and step <= warm_end:
        pct = step / warm_end
        lr, beta1 = _anneal(start_lr, peak, pct), _anneal(0.95, 0.85, pct)
    else:
        pct = (step - warm_end) / (total - 1 - warm_end)
        lr, beta1 = _anneal(peak, min_lr, pct), _anneal(0.85, 0.95, pct)
    return {"lr": lr, "betas": (beta1, 0.999)}


def _anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` to ``end`` as ``pct`` goes from 0 to 1."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def train_gate(model: GatedModel, train: ImageSet, imp: torch.Tensor, cfg: GateConfig,
               run_dir: str | Path) -> GatedModel:
    """Attach a new gate of ``cfg.kind`` to ``model`` (backbone fixed) and train it; resumable per epoch."""
    torch.manual_seed(cfg.seed)
    gate = make_gate(cfg, model.backbone)  # refuses a bad config before the run directory is touched
    if imp.shape != (len(train), model.num_units):
        raise ValueError(f"labels are {tuple(imp.shape)}, expected ({len(train)}, {model.num_units})")
    run = RunDir(run_dir, "gate")
    run.check_config(cfg)
    model.gate = gate
    model.refresh_flops()
    model.backbone.eval().requires_grad_(False)
    saving = model.flops.saving().float()
    cost = saving / saving.mean()

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> BatchResult:
        images = train.images[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5  # flips keep labels valid; crops would not
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return objective_loss(gate_scores(model, normalize(images)), imp[idx], cost, cfg, g), {}

    opt = torch.optim.Adam(model.gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(cfg.epochs * math.ceil(len(train) / cfg.batch_size), 1)
    loop = Loop(name=f"S4 {cfg.kind}", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                state_key="gate", loss_name="loss")
    train_epochs(loop, run, model.gate, opt, len(train), batch=batch_loss,
                 schedule=lambda step: one_cycle(step, total, cfg.lr))
    model.gate.eval()
    model.backbone.requires_grad_(True)
    return model
