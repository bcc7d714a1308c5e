"""S4: train the gate G on importance labels, backbone M fixed.

sigmoid(G(x)_i) is the probability that unit i stays open. Objectives:
- ``reward`` (the patent's): maximise sum_i sigmoid(G(x)_i) * (imp(x,i) - price * cost_i) by gradient ascent;
- ``reinforce``: sample open/closed decisions a ~ Bernoulli(sigmoid(G)), reward
  R = sum_i a_i (imp(x,i) - price * cost_i), ascend (R - mean R) * grad log p(a);
- ``regression``: fit G(x)_i to imp(x,i) (Huber loss), so threshold alpha reads as an importance level.
cost_i is unit i's FLOPs saving relative to the mean unit's, so ``price`` is in loss units per average unit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gating.backbones import ResidualBackbone
from gating.gates import Gate, build_gate
from gating.model import GatedModel
from training.data import ImageSet, batches, normalize
from training.run import RunDir, epoch_generator

OBJECTIVES = ("reward", "reinforce", "regression")


@dataclass
class GateConfig:
    kind: str = "resnet8"  # resnet8 | lstm | mlp
    # keyword arguments of the gate class: {resolution: 16} runs resnet8 on a 16x16 average-pooled
    # image (a quarter of its FLOPs), {hidden: 64} widens lstm/mlp
    hyper: dict = field(default_factory=dict)
    # one of OBJECTIVES. "regression" is the default: its scores rank units by predicted importance,
    # which greedy, softmax and budget need; "reward" and "reinforce" learn only which side of the
    # price a unit falls (saturated sigmoids), which suits the threshold rule alone (see tests).
    objective: str = "regression"
    price: float = 0.0  # lambda: the price of one average unit's compute, in loss units
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3  # Adam
    weight_decay: float = 1e-4
    seed: int = 0
    # ordered gates only: the per-image term times this after training. Trained on importance alone it
    # spreads images too far from the common order (runs/aug-labels: 0.5058 before S5 at 1.0, 0.5488 at 0.25)
    image_scale: float = 1.0


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
    if cfg.image_scale != 1 and not gate.ordered:
        raise ValueError(f"image_scale {cfg.image_scale} scales an ordered gate's per-image term; this {cfg.kind} "
                         f"gate is not ordered (resnet8 with hyper {{ordered: true}})")
    if cfg.image_scale < 0:
        raise ValueError(f"image_scale must be >= 0 (0: every image on one path), got {cfg.image_scale}")
    return gate


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
    opt = torch.optim.Adam(model.gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    start = 0
    state = run.resume()
    if state is not None:
        model.gate.load_state_dict(state["gate"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
    saving = model.flops.saving().float()
    cost = saving / saving.mean()
    for epoch in range(start, cfg.epochs):
        model.gate.train()
        g = epoch_generator(cfg.seed, epoch)
        t0, total, seen = time.perf_counter(), 0.0, 0
        for idx in tqdm(batches(len(train), cfg.batch_size, g=g), desc=f"S4 {cfg.kind} epoch {epoch + 1}/{cfg.epochs}",
                        unit="batch", leave=False, total=(len(train) + cfg.batch_size - 1) // cfg.batch_size):
            images = train.images[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # flips keep labels valid; crops would not
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            loss = objective_loss(gate_scores(model, normalize(images)), imp[idx], cost, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        run.end_epoch({"gate": model.gate.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "epoch": epoch + 1},
                      {"epoch": epoch, "loss": total / seen, "seconds": time.perf_counter() - t0})
    if cfg.image_scale != 1:  # after the loop: the saved state stays the trained gate, so a rerun scales it once
        model.gate.scale_image_term(cfg.image_scale)
    model.gate.eval()
    model.backbone.requires_grad_(True)
    return model
