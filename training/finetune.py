"""S5: gate fixed, finetune the backbone so each image runs only its own units; then recalibrate BN."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from gating.executor import execute
from gating.model import GatedModel
from gating.policies import Policy, knob_for_flops, make_policy
from training.backbone import reestimate_bn
from training.data import ImageSet, augment, check_cutout, cutout, normalize
from training.loop import BatchResult, Loop, train_epochs
from training.run import RunDir, pick_device, use_bf16, weights_digest


@dataclass
class FinetuneConfig:
    policy: Optional[str] = None  # the rule the model will be served with (None: the checkpoint's own)
    knob: Optional[float] = None  # its knob (None: the checkpoint's, when the rule is the checkpoint's)
    # threshold or softmax only: instead of `knob`, the mean FLOPs ratio (gate counted) the knob is set to
    # spend on training images when S5 starts; a threshold's alpha depends on the gate's scale, a ratio does not
    flops_target: Optional[float] = None
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01  # peak learning rate
    schedule: str = "cosine"  # "cosine" from lr to zero, or "constant" (SWA's, with average_from)
    # stochastic weight averaging (Izmailov et al. 2018): from this epoch on (0-based), the backbone's weights are
    # averaged at every epoch end and S5 ships the average, its BN recalibrated on the gated paths; None = off
    average_from: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    recalibration_images: int = 10_000  # augmented training images whose gated paths set the BN statistics
    cutout: int = 0  # Cutout square side in S5's training images and its BN recalibration (0 = crop and flip only)
    distill: float = 0.0  # weight of distillation from the full-path teacher (0 = plain cross-entropy)
    temperature: float = 4.0  # softens teacher and student logits for distillation
    amp: Union[str, bool] = "auto"  # YAML reads on/off as true/false; bf16 autocast, as in S1
    device: str = "auto"  # "auto" = the accelerator when present; the model comes back on the CPU
    channels_last: bool = True  # faster convolutions on CPU and GPU, as in S1
    seed: int = 0


def train_on_own_paths(model: GatedModel, x: torch.Tensor, y: torch.Tensor, *,
                       teacher: Optional[torch.nn.Module] = None, distill: float = 0.0,
                       temperature: float = 4.0) -> torch.Tensor:
    """One forward through each image's own path (units it skips get no gradient from it); returns the loss.

    With a teacher (the full backbone, every unit run), the loss mixes cross-entropy with
    Hinton distillation: the gated path learns to reproduce what the full network would say.
    """
    with torch.autocast(x.device.type, enabled=False):  # decisions exactly as served, in fp32
        keep = model.decide(x)
    model.backbone.train()
    logits = execute(model.backbone, x, keep)  # (B, classes)
    loss = F.cross_entropy(logits, y)
    if teacher is None or distill == 0:
        return loss
    with torch.no_grad():
        target = F.softmax(teacher(x).float() / temperature, dim=1)
    soft = F.kl_div(F.log_softmax(logits.float() / temperature, dim=1), target, reduction="batchmean")
    return (1 - distill) * loss + distill * temperature ** 2 * soft


def check_policy(cfg: FinetuneConfig, current: Policy, upfront_gate: bool, *, gated: bool = True) -> Optional[Policy]:
    """Refuse, before any work, a rule and knob that cannot be served: ``current`` is the model's rule,
    which S5 keeps when ``cfg`` names none. Returns the rule when ``cfg`` fixes its knob, None when
    ``flops_target`` is to set it. A model without a gate (``gated`` False: a static cut) trains its one
    path, every unit it has, under policy full."""
    name = cfg.policy or current.name
    if not gated:
        if name != "full" or cfg.flops_target is not None:
            raise ValueError(f"this model has no gate: it runs every unit it has (policy full), not {name!r}")
        return make_policy("full")
    if name == "full":
        raise ValueError("S5 trains the backbone on each image's gated path, and policy 'full' runs every unit: "
                         "name the rule to serve (policy and knob, or flops_target)")
    if cfg.flops_target is not None:
        if cfg.knob is not None:
            raise ValueError(f"set knob or flops_target, not both (knob {cfg.knob}, flops_target {cfg.flops_target})")
        if name not in ("threshold", "softmax"):
            raise ValueError(f"flops_target sets the knob of the threshold or softmax rule, not of {name!r}")
        if not 0 < cfg.flops_target <= 1:
            raise ValueError(f"flops_target must be in (0, 1], got {cfg.flops_target}")
        if not upfront_gate:
            raise ValueError("flops_target needs an up-front gate (resnet8): an inline gate's scores depend on "
                             "the path the rule has already taken")
        return None
    if cfg.knob is None and name != current.name:
        raise ValueError(f"policy {name!r} needs a knob or a flops_target (the model serves {current!r})")
    return make_policy(name, cfg.knob if cfg.knob is not None else current.knob)  # raises on a bad knob


def served_policy(model: GatedModel, data: ImageSet, cfg: FinetuneConfig, *, images: int = 10_000) -> Policy:
    """The rule S5 trains for and the model is served with: ``cfg``'s, or the model's own where ``cfg``
    leaves it out. With ``cfg.flops_target``, the knob whose mean FLOPs on ``images`` clean training
    images (a seeded sample, all when there are fewer), gate counted, is that ratio."""
    fixed = check_policy(cfg, model.policy, model.gate is not None and model.gate.upfront, gated=model.gate is not None)
    if fixed is not None:
        return fixed
    name = cfg.policy or model.policy.name
    scores = scores_on_sample(model, data, images, cfg.seed)
    return make_policy(name, knob_for_flops(name, scores, model.flops, cfg.flops_target, gate_flops=model.gate_flops))


@torch.inference_mode()
def scores_on_sample(model: GatedModel, data: ImageSet, images: int, seed: int) -> torch.Tensor:
    """(images, n) scores of the up-front gate on clean training images, computed on the CPU: the knob
    set from them must not depend on the device S5 trains on (S4 runs on the CPU, S5 may not)."""
    gate = copy.deepcopy(model.gate).cpu().eval()
    stats = (model.card.mean, model.card.std) if model.card else ()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images]
    return torch.cat([gate(normalize(data.images[idx], *stats)).float() for idx in order.split(250)])


def recalibrate_bn(model: GatedModel, data: ImageSet, *, images: int, batch_size: int = 250, seed: int = 0,
                   cutout_size: int = 0) -> None:
    """Reset every backbone BN's running statistics and re-estimate them on the gated paths of
    ``images`` training images (all of them when there are fewer).

    The images are augmented as the weights were trained (random crop and flip, plus Cutout of
    ``cutout_size`` for a backbone S1 trained with it): statistics of clean images do not match
    weights trained on augmented ones.
    """
    def own_paths(x: torch.Tensor) -> torch.Tensor:
        keep = model.decide(x)
        model.backbone.train()  # decide() may have put the model in eval mode
        return execute(model.backbone, x, keep)

    try:
        reestimate_bn(model.backbone, data, images=images, batch_size=batch_size, seed=seed, cutout_size=cutout_size,
                      forward=own_paths)
    finally:
        model.eval()


def serve_new_gate(model: GatedModel, data: ImageSet, cfg: FinetuneConfig, *, cutout_size: int) -> GatedModel:
    """S4's ending, before S5 or serving: the rule and knob of ``cfg`` (see ``served_policy``), then BN
    statistics re-estimated on the new gate's paths, on images augmented as the backbone was last trained
    (``cutout_size``: that training's Cutout). A new gate sends images down other paths, whose BN inputs
    differ from those of the paths the statistics were estimated on."""
    model.policy = served_policy(model, data, cfg)
    recalibrate_bn(model, data, images=cfg.recalibration_images, seed=cfg.seed, cutout_size=cutout_size)
    return model


def check_config(cfg: FinetuneConfig) -> None:
    """Every field S5 could otherwise refuse only after its first epoch, or never (the pipeline calls
    this before S1, for the [finetune] section and for [refine]'s)."""
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise ValueError(f"epochs must be >= 0 (0: recalibrate BN only) and batch_size >= 1, "
                         f"got {cfg.epochs} and {cfg.batch_size}")
    check_path_training(cfg)


def frozen_teacher(teacher: Optional[torch.nn.Module], backbone: torch.nn.Module,
                   distill: float) -> Optional[torch.nn.Module]:
    """A frozen copy of ``teacher``, or of ``backbone`` as it is now, for distillation (None without it):
    a copy, since the teacher may be the very module being trained."""
    if not distill:
        return None
    return copy.deepcopy(teacher if teacher is not None else backbone).eval().requires_grad_(False)


def check_path_training(cfg) -> None:
    """The fields S5 and the joint stage share: BN recalibration, schedule, averaging, Cutout, device, amp."""
    if cfg.recalibration_images < 1:
        raise ValueError(f"recalibration_images must be >= 1 (BN statistics come from them), got {cfg.recalibration_images}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.average_from is not None and (isinstance(cfg.average_from, bool) or not isinstance(cfg.average_from, int)
                                         or not 0 <= cfg.average_from < cfg.epochs):
        raise ValueError(f"average_from must be an epoch in [0, {cfg.epochs}) (or None: no averaging), "
                         f"got {cfg.average_from!r}")
    check_cutout(cfg.cutout)
    pick_device(cfg.device)
    use_bf16(torch.device("cpu"), cfg.amp)  # refuses an unknown amp setting


def finetune(model: GatedModel, train: ImageSet, cfg: FinetuneConfig, run_dir: str | Path, *,
             teacher: Optional[torch.nn.Module] = None) -> GatedModel:
    """Finetune ``model``'s backbone on its gate's paths. With ``cfg.distill`` > 0 the teacher is
    ``teacher`` (run in full), or else a frozen copy of the backbone as it enters S5."""
    check_config(cfg)
    check_policy(cfg, model.policy, model.gate is not None and model.gate.upfront, gated=model.gate is not None)
    device = pick_device(cfg.device)
    run = RunDir(run_dir, "finetune")
    run.check_config(cfg, {"start_weights": weights_digest(model.state_dict())})  # backbone and gate
    teacher = frozen_teacher(teacher, model.backbone, cfg.distill)
    use_amp = use_bf16(device, cfg.amp)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device)
    model.backbone.to(memory_format=fmt)
    if teacher is not None:
        teacher.to(device, memory_format=fmt)
    model.policy = served_policy(model, train, cfg)
    if model.gate is not None:
        model.gate.requires_grad_(False)
    opt = torch.optim.SGD(list(model.backbone.parameters()), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    total = max(cfg.epochs * math.ceil(len(train) / cfg.batch_size), 1)

    def lr_at(step: int) -> dict:  # "cosine": from cfg.lr at the first step to zero after the last
        if cfg.schedule == "constant":
            return {"lr": cfg.lr}
        return {"lr": 0.5 * cfg.lr * (1 + math.cos(math.pi * (step / total)))}

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> BatchResult:
        x = normalize(augment(train.images[idx], g))
        if cfg.cutout:
            x = cutout(x, cfg.cutout, g)
        x = x.to(device, memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = train_on_own_paths(model, x, train.labels[idx].to(device), teacher=teacher, distill=cfg.distill,
                                      temperature=cfg.temperature)
        return loss, {}

    loop = Loop(name="S5", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, state_key="backbone",
                average_from=cfg.average_from)
    average = train_epochs(loop, run, model.backbone, opt, len(train), batch=batch_loss, schedule=lr_at)
    if average is not None:  # its BN statistics are re-estimated on the gated paths below
        model.backbone.load_state_dict(average.module.state_dict())
    recalibrate_bn(model, train, images=cfg.recalibration_images, seed=cfg.seed, cutout_size=cfg.cutout)
    model.backbone.to(memory_format=torch.contiguous_format)
    if model.gate is not None:
        model.gate.requires_grad_(True)
    return model.cpu().eval()
