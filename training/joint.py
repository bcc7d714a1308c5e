"""Joint: gate and backbone trained together through the decisions (ConvNet-AIG style), after S4.

S4 trains the gate on importance labels with the backbone fixed; S5 trains the backbone on the
gate's paths with the gate fixed. The joint stage trains both at once, end to end:

- training decisions: the gate's scores s (B, n) plus logistic noise (Gumbel-sigmoid), z = s + noise;
  forward, unit i runs where z_i > 0 (a hard 0/1 decision: the threshold rule at alpha 0 on noisy
  scores); backward, the decision's gradient is that of sigmoid(z_i / gumbel_temperature)
  (straight-through). The backbone runs every unit on every image and mixes,
  ``h = k * unit(h) + (1 - k) * unit.skip(h)``, so the loss reaches the gate through k.
- loss: (1 - distill) * CE + distill * T^2 * KL(teacher || student) (the full backbone, frozen, as
  in S5), plus ``flops_weight * (mean FLOPs ratio of the batch - t)^2``, the ratio gate counted and
  taken against ``model.flops.reference``, from the straight-through decisions times each unit's
  saving (differentiable).
- t, the batch's FLOPs target, is drawn uniformly from ``target_range`` for every batch, so one
  checkpoint is trained across budgets; with ``cap_paths`` the backbone runs the decisions under the
  budget rule at t (the lowest-scored kept units dropped until the image fits), the paths the SLO
  autopilot's cap makes.
- serving: the threshold rule, its alpha set so the mean FLOPs ratio on training images is
  ``target`` (no noise), then BN statistics re-estimated on those paths (as S4's and S5's endings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from gating.gates import ResNet8Gate, build_gate
from gating.model import GatedModel
from gating.policies import capped, knob_for_flops, make_policy
from training.backbone import distillation, reestimate_bn
from training.data import ImageSet, augment, cutout, normalize
from training.finetune import (FinetuneConfig, check_path_training, frozen_teacher, recalibrate_bn, scores_on_sample,
                               served_policy)
from training.loop import BatchResult, Loop, train_epochs
from training.run import RunDir, pick_device, use_bf16, weights_digest

KNOB_IMAGES = 10_000  # clean training images (a seeded sample) a threshold's alpha is set on, as S5's flops_target


@dataclass
class JointConfig:
    # the served point: the mean FLOPs ratio (gate counted, against the uncut backbone) the threshold
    # rule's alpha is set to spend on training images after training, in (0, 1]
    target: float = 0.6
    # [lo, hi]: every batch draws its FLOPs target t uniformly from it (the FLOPs term's, and the cap's
    # with cap_paths), so one checkpoint is trained across budgets; None: t = target for every batch
    target_range: Optional[list[float]] = None
    # the backbone runs each batch's decisions under the budget rule at t (drop the lowest-scored kept
    # units until the image's backbone FLOPs fit t), as the autopilot's cap serves them; the FLOPs term
    # is still taken on the gate's own decisions, before the cap
    cap_paths: bool = False
    flops_weight: float = 10.0  # weight of the FLOPs term (mean ratio of the batch - t)^2; 0 = off
    gumbel_temperature: float = 1.0  # Gumbel-sigmoid temperature of the decisions' soft gradient (> 0)
    # True: start from the input's gate (the S3-S4 route); False: a new gate of the same architecture,
    # randomly initialised with `seed`, to measure what that route's initialisation is worth
    init_gate: bool = True
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01  # backbone: SGD (Nesterov momentum) peak learning rate, as S5
    gate_lr: float = 1e-3  # gate: Adam's peak learning rate (same schedule shape as the backbone's)
    schedule: str = "cosine"  # "cosine" from the peaks to zero, or "constant" (SWA's, with average_from)
    # from this epoch on (0-based) gate and backbone weights are averaged at every epoch end and the average
    # is shipped, its BN statistics re-estimated; None = off
    average_from: Optional[int] = None
    momentum: float = 0.9  # backbone SGD momentum
    weight_decay: float = 5e-4  # backbone weight decay
    gate_weight_decay: float = 1e-4  # gate weight decay (Adam's L2, as S4)
    distill: float = 0.7  # weight of distillation from the full-path teacher (0 = plain cross-entropy)
    temperature: float = 4.0  # distillation temperature T: softens teacher and student logits
    recalibration_images: int = 10_000  # augmented training images whose served paths set the BN statistics
    cutout: int = 0  # Cutout square side in training images and BN recalibration (0 = crop and flip only)
    amp: Union[str, bool] = "auto"  # bf16 autocast for the backbone, as S5 (the gate runs in fp32)
    device: str = "auto"  # "auto" = the accelerator when present; the model comes back on the CPU
    channels_last: bool = True  # backbone layout, as S5
    seed: int = 0  # batch order, augmentation, targets, decision noise, and a new gate's weights


def target_bounds(cfg: JointConfig) -> tuple[float, float]:
    """(lo, hi) of the batches' FLOPs targets."""
    if cfg.target_range is None:
        return cfg.target, cfg.target
    return float(cfg.target_range[0]), float(cfg.target_range[1])


def check_config(cfg: JointConfig) -> None:
    """Every field the joint stage could otherwise refuse only after work (the pipeline calls this
    before S1); errors name the field."""
    if isinstance(cfg.target, bool) or not isinstance(cfg.target, (int, float)) or not 0 < cfg.target <= 1:
        raise ValueError(f"target must be a FLOPs ratio in (0, 1], got {cfg.target!r}")
    if cfg.target_range is not None:
        r = cfg.target_range
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)):
            raise ValueError(f"target_range must be [lo, hi], two FLOPs ratios, got {r!r}")
        lo, hi = r
        if not (0 < lo <= 1 and 0 < hi <= 1):
            raise ValueError(f"target_range must lie in (0, 1], got {list(r)}")
        if lo > hi:
            raise ValueError(f"target_range must be [lo, hi] with lo <= hi, got {list(r)}")
        if not lo <= cfg.target <= hi:
            raise ValueError(f"target {cfg.target} (the served point) must lie in target_range {list(r)}")
    if not isinstance(cfg.flops_weight, (int, float)) or not cfg.flops_weight >= 0:
        raise ValueError(f"flops_weight must be >= 0, got {cfg.flops_weight!r}")
    if not cfg.gumbel_temperature > 0:
        raise ValueError(f"gumbel_temperature must be > 0, got {cfg.gumbel_temperature}")
    if not cfg.temperature > 0:
        raise ValueError(f"temperature (distillation's) must be > 0, got {cfg.temperature}")
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if cfg.lr < 0 or cfg.gate_lr < 0:
        raise ValueError(f"lr and gate_lr must be >= 0, got {cfg.lr} and {cfg.gate_lr}")
    if cfg.weight_decay < 0 or cfg.gate_weight_decay < 0 or cfg.momentum < 0:
        raise ValueError(f"weight_decay, gate_weight_decay and momentum must be >= 0, got {cfg.weight_decay}, "
                         f"{cfg.gate_weight_decay} and {cfg.momentum}")
    check_path_training(cfg)


def check_model(model: GatedModel, cfg: JointConfig) -> None:
    """What the input model must be for ``cfg``: an up-front ResNet-8 gate (straight-through decisions
    and the served threshold's flops_target need every score before the backbone runs), and targets it
    can spend (skipping every unit still costs the stem, head, shortcuts and gate)."""
    if model.gate is None:
        raise ValueError("the joint stage trains a gate with its backbone: its model needs a gate (an S4 output)")
    if not isinstance(model.gate, ResNet8Gate):
        raise ValueError(f"the joint stage needs an up-front resnet8 gate, not {model.gate.kind!r}: straight-through "
                         "decisions and the served flops_target need every score before the backbone runs")
    floor = (model.flops.minimum + model.gate_flops) / model.flops.reference
    lo, _ = target_bounds(cfg)
    if min(lo, cfg.target) < floor:
        raise ValueError(f"target {cfg.target} / target_range {cfg.target_range}: below what skipping every unit "
                         f"costs ({floor:.4f} of the backbone, gate counted)")


# ------------------------------------------------------------------ decisions and loss
def logistic_noise(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Logistic(0, 1) samples: the difference of two Gumbels, what a Gumbel-sigmoid adds to a logit."""
    u = torch.rand(shape, generator=g).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


@dataclass
class Decisions:
    rule: torch.Tensor  # (B, n) straight-through decisions of the gate: hard 0/1 forward, sigmoid's gradient
    path: torch.Tensor  # (B, n) the same, under the cap where cap_paths: what the backbone runs
    flops_ratio: torch.Tensor  # (B,) FLOPs of `rule` (gate counted) / reference: differentiable


def decide_soft(model: GatedModel, x: torch.Tensor, target: float, cfg: JointConfig,
                g: torch.Generator) -> Decisions:
    """Training decisions for normalised images ``x``: Gumbel-sigmoid on the gate's scores, straight
    through; with ``cfg.cap_paths`` the backbone's path is the budget rule at ``target`` on top."""
    flops = model.flops
    with torch.autocast(x.device.type, enabled=False):  # scores, decisions and FLOPs in fp32
        real = model.gate.score_all(x.float())  # (B, n)
        noisy = real + logistic_noise(real.shape, g).to(real.device)
        z = model.gate.rule_scores(noisy)  # +inf for units the gate does not decide
        soft = torch.sigmoid(z / cfg.gumbel_temperature)
        hard = z.detach() > 0  # the threshold rule at alpha 0 on the noisy scores
        rule = hard.to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward
        path = rule
        if cfg.cap_paths:
            # threshold 0 under a cap on the noisy scores: the autopilot's capped rule, for these scores
            fits = capped(make_policy("threshold", 0.0), target).decide(z.detach(), flops, noisy.detach())
            fits = fits.to(z.device)
            path = (hard & fits).to(soft.dtype) + (soft - soft.detach())
        saving = (flops.saving() / flops.reference).to(device=z.device, dtype=soft.dtype)  # (n,)
        ratio = (flops.minimum + model.gate_flops) / flops.reference + rule @ saving  # (B,)
    return Decisions(rule, path, ratio)


def masked_forward(model: GatedModel, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits of the backbone with every unit run on every image and mixed by ``keep`` (B, n) in [0, 1]:
    ``h = k * unit(h) + (1 - k) * unit.skip(h)``, so the loss's gradient reaches the decisions."""
    backbone = model.backbone
    h = backbone.stem(x)
    for i, unit in enumerate(backbone.units):
        k = keep[:, i].view(-1, 1, 1, 1)
        ran, skipped = unit(h), unit.skip(h)
        k = k.to(ran.dtype)
        h = k * ran + (1 - k) * skipped
    return backbone.head(h)


def joint_loss(model: GatedModel, x: torch.Tensor, y: torch.Tensor, target: float, cfg: JointConfig,
               g: torch.Generator, *, teacher: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict]:
    """The joint objective of one batch at FLOPs target ``target``, and its parts (per-batch means):
    ``ce``, ``flops_ratio`` (the backbone's path, hard, gate counted)."""
    d = decide_soft(model, x, target, cfg, g)
    logits = masked_forward(model, x, d.path)
    ce = F.cross_entropy(logits.float(), y)
    loss = ce
    if teacher is not None and cfg.distill > 0:
        loss = (1 - cfg.distill) * ce + cfg.distill * distillation(logits, teacher, x, cfg.temperature)
    if cfg.flops_weight > 0:
        loss = loss + cfg.flops_weight * (d.flops_ratio.mean() - target) ** 2
    with torch.no_grad():
        path = d.path.detach() > 0.5
        spent = (model.flops.executed(path) + model.gate_flops) / model.flops.reference
    return loss, {"ce": ce.detach(), "flops_ratio": spent.mean()}


# ------------------------------------------------------------------ the optimizer
class _TwoOptimizers:
    """SGD for the backbone and Adam for the gate, as the one optimizer the shared loop steps: every
    parameter group keeps its own peak learning rate (``peak``); the loop's schedule sets one ``scale``
    of it for all groups (cosine or constant), applied at each step."""

    def __init__(self, backbone: torch.optim.Optimizer, gate: torch.optim.Optimizer):
        self.parts = {"backbone": backbone, "gate": gate}
        for opt in self.parts.values():
            for group in opt.param_groups:
                group["peak"], group["scale"] = group["lr"], 1.0

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.parts.values() for group in opt.param_groups]

    @property
    def state(self):  # the loop clears it at a warm restart (the joint stage has none)
        return _ClearAll(self.parts.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for group in self.param_groups:
            group["lr"] = group["peak"] * group["scale"]
        for opt in self.parts.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


class _ClearAll:
    def __init__(self, opts):
        self.opts = list(opts)

    def clear(self) -> None:
        for opt in self.opts:
            opt.state.clear()


# ------------------------------------------------------------------ the gate's start
@torch.no_grad()
def start_gate(model: GatedModel, train: ImageSet, cfg: JointConfig) -> None:
    """The gate training starts from: the input's (``init_gate``) or a new one of its architecture, seeded;
    then its last layer rescaled, by one factor and one shift for every unit, so that its scores on clean
    training images have unit standard deviation and the hard decisions at zero noise (threshold 0) spend
    ``target``: the gate's ranking kept, its operating point the served one, its scale that of the noise."""
    if not cfg.init_gate:
        hyper = model.gate.config()
        kind = hyper.pop("kind")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model.gate = build_gate(kind, model.backbone, **hyper)
        model.refresh_flops()
    scores = scores_on_sample(model, train, KNOB_IMAGES, cfg.seed)  # (N, n), +inf: undecided units
    alpha = knob_for_flops("threshold", scores, model.flops, cfg.target, gate_flops=model.gate_flops)
    decided = scores[:, list(model.gate.units)] if model.gate.units is not None else scores
    std = float(decided.double().std()) if decided.numel() > 1 else 0.0
    scale = 1.0 / std if std > 1e-8 and math.isfinite(std) else 1.0
    fc = model.gate.fc
    fc.weight.mul_(scale)
    fc.bias.add_(alpha).mul_(scale)  # keep where s + alpha >= 0, i.e. -s <= alpha


# ------------------------------------------------------------------ the stage
def train_joint(model: GatedModel, train: ImageSet, cfg: JointConfig, run_dir: str | Path, *,
                teacher: Optional[torch.nn.Module]) -> GatedModel:
    """Train ``model``'s gate and backbone together (see the module's docstring); return it on the CPU in
    eval mode, served with the threshold rule at ``cfg.target`` and BN re-estimated on those paths.
    With ``cfg.distill`` > 0 the teacher is ``teacher`` (run in full), or else a frozen copy of the
    backbone as it enters the stage."""
    check_config(cfg)
    check_model(model, cfg)
    device = pick_device(cfg.device)
    run = RunDir(run_dir, "joint")
    run.check_config(cfg, {"start_weights": weights_digest(model.state_dict())})  # backbone and gate
    teacher = frozen_teacher(teacher, model.backbone, cfg.distill)
    start_gate(model, train, cfg)  # a resumed run's saved weights replace it
    use_amp = use_bf16(device, cfg.amp)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.requires_grad_(True)
    model.to(device)
    model.backbone.to(memory_format=fmt)
    if teacher is not None:
        teacher.to(device, memory_format=fmt)
    opt = _TwoOptimizers(
        torch.optim.SGD(model.backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0),
        torch.optim.Adam(model.gate.parameters(), lr=cfg.gate_lr, weight_decay=cfg.gate_weight_decay))
    total = max(cfg.epochs * math.ceil(len(train) / cfg.batch_size), 1)
    lo, hi = target_bounds(cfg)

    def scale_at(step: int) -> dict:  # "cosine": from the peaks at the first step to zero after the last
        if cfg.schedule == "constant":
            return {"scale": 1.0}
        return {"scale": 0.5 * (1 + math.cos(math.pi * (step / total)))}

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> BatchResult:
        x = normalize(augment(train.images[idx], g))
        if cfg.cutout:
            x = cutout(x, cfg.cutout, g)
        target = lo + (hi - lo) * float(torch.rand((), generator=g)) if hi > lo else lo
        x = x.to(device, memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, parts = joint_loss(model, x, train.labels[idx].to(device), target, cfg, g, teacher=teacher)
        n = len(idx)
        return loss, {"ce": parts["ce"] * n, "flops_ratio": parts["flops_ratio"] * n, "target": target * n}

    loop = Loop(name="joint", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, state_key="model",
                average_from=cfg.average_from)
    average = train_epochs(loop, run, model, opt, len(train), batch=batch_loss, schedule=scale_at)
    model.backbone.to(memory_format=torch.contiguous_format)
    if average is not None:
        # parameters averaged; BN buffers are not: the gate's are re-estimated here, the backbone's below
        model.load_state_dict(average.module.state_dict())
        reestimate_bn(model.gate, train, images=cfg.recalibration_images, seed=cfg.seed, cutout_size=cfg.cutout)
    model.eval()
    model.policy = served_policy(model, train, FinetuneConfig(policy="threshold", flops_target=cfg.target,
                                                              seed=cfg.seed), images=KNOB_IMAGES)
    recalibrate_bn(model, train, images=cfg.recalibration_images, seed=cfg.seed, cutout_size=cfg.cutout)
    return model.cpu().eval()
