"""S1: pretrain the residual backbone M (SGD + momentum, cosine or step schedule)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from gating.backbones import ArchSpec, ResidualBackbone, build_backbone
from gating.checkpoint import ModelCard
from gating.executor import execute
from gating.model import GatedModel
from gating.zoo import resolve_checkpoint
from training.data import CIFAR_MEAN, CIFAR_STD, ImageSet, augment, batches, check_cutout, cutout, load_image_folder, \
    normalize, split_train_val
from training.grow import grow
from training.loop import BatchResult, Loop, train_epochs
from training.run import RunDir, pick_device, use_bf16, weights_digest


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BackboneConfig:
    arch: str = "resnet32"  # a registered CIFAR ResNet
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"  # image folder or archive
    val_fraction: float = 0.1  # held out, stratified, fixed by split_seed
    split_seed: int = 0
    limit_train: Optional[int] = None  # use only the first N training images (tests, smoke runs)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate, after warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" to zero, "step" (x0.1 at 50% and 75% of training), or "constant"
    restarts: list[int] = field(default_factory=list)  # cosine only: epochs where lr jumps back to its peak
    # (SGDR warm restarts; each cycle warms up again and starts with fresh momentum)
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    cutout: int = 0  # side of a square zeroed at a random place in each training image (16 in the paper); 0 = off
    bn_l1: float = 0.0  # L1 penalty on BN gamma (network slimming sparsity training)
    seed: int = 0
    device: str = "auto"  # "auto" = the accelerator when present
    channels_last: bool = True  # faster convolutions on CPU and GPU
    # bf16 autocast: "auto" = where the hardware has native bf16 (CUDA, AMX/AVX512-BF16 CPUs); "on"/"off",
    # or true/false, which is how YAML reads a bare on/off
    amp: Union[str, bool] = "auto"
    compile: bool = False  # torch.compile the training forward (compiling takes a while; the steps are faster)
    # torch.compile mode: "reduce-overhead" replays CUDA graphs, which a GPU needs for CIFAR ResNets, whose
    # small steps are bound by kernel launches
    compile_mode: Optional[str] = None
    init: Optional[str] = None  # start from this checkpoint's backbone (e.g. a pruned one); arch comes from it
    keep_zeros: bool = False  # with init: weights exactly zero there stay zero (magnitude-pruned retraining)
    grow: Optional[str] = None  # with init: deepen it to this CIFAR ResNet by identity-initialised units
    teacher: Optional[str] = None  # checkpoint whose backbone, run in full, the model learns to imitate
    distill: float = 0.0  # weight of Hinton distillation from the teacher (0 = plain cross-entropy)
    temperature: float = 4.0  # softens teacher and student logits for distillation
    # stochastic depth (Huang et al. 2016): in training, each image skips unit i with probability
    # drop_units * (i + 1) / n, so the network learns to run on partial paths, as the gate will make it
    drop_units: float = 0.0
    # stochastic weight averaging (Izmailov et al. 2018): from this epoch on (0-based), the weights are averaged
    # at every epoch end, and the checkpoint is the average, its BN statistics re-estimated; None = off
    average_from: Optional[int] = None
    average_bn_images: int = 10_000  # augmented training images that set the average's BN statistics


def draw_paths(n_images: int, n_units: int, drop: float, g: torch.Generator) -> torch.Tensor:
    """(B, n) bool, True = run: unit i dropped with probability drop * (i + 1) / n (the linear decay rule)."""
    return torch.rand(n_images, n_units, generator=g) >= drop * torch.arange(1, n_units + 1) / n_units


def cycle_of(cfg: BackboneConfig, epoch: float) -> tuple[int, int]:
    """(first, end) epoch of the schedule cycle holding `epoch`; one cycle unless restarts are set."""
    bounds = [0, *sorted(cfg.restarts), cfg.epochs]
    for first, end in zip(bounds, bounds[1:]):
        if epoch < end:
            return first, end
    return bounds[-2], bounds[-1]


def continues_schedule(old: dict, new: dict) -> bool:
    """Whether an S1 run recorded under config ``old`` may go on under ``new``: the same in every field
    but a later end, where the old end is now a warm restart. The epochs already run had the learning
    rates ``new`` gives them, so the extended run is the one ``new`` would have trained from scratch."""
    rest = lambda c: {k: v for k, v in c.items() if k not in ("epochs", "restarts")}  # noqa: E731
    end = old.get("epochs")
    return (rest(old) == rest(new) and isinstance(end, int) and new["epochs"] > end and end in new["restarts"]
            and sorted(r for r in new["restarts"] if r < end) == sorted(old.get("restarts", [])))


def lr_at(cfg: BackboneConfig, step: int, steps_per_epoch: int) -> float:
    t = step / steps_per_epoch  # epochs done, fractional
    first, end = cycle_of(cfg, t) if cfg.schedule == "cosine" else (0, cfg.epochs)
    t -= first
    if t < cfg.warmup_epochs:
        return cfg.lr * (t + 1 / steps_per_epoch) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        p = (t - cfg.warmup_epochs) / max(end - first - cfg.warmup_epochs, 1e-9)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(p, 1.0)))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** sum(t >= f * cfg.epochs for f in (0.5, 0.75)))
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine', 'step' or 'constant'")


def load_split(cfg) -> tuple[ImageSet, ImageSet]:
    data = load_image_folder(cfg.data)
    train, val = split_train_val(data, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if cfg.limit_train:
        train = train.sample(cfg.limit_train, seed=cfg.split_seed)
    return train, val


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageSet, *, batch_size: int = 500,
             device: torch.device = torch.device("cpu")) -> float:
    """Top-1 accuracy of a plain backbone (policy full)."""
    model.eval()
    correct = 0
    for idx in batches(len(data), batch_size):
        x = normalize(data.images[idx]).to(device)
        correct += (model(x).argmax(1).cpu() == data.labels[idx]).sum().item()
    return correct / max(len(data), 1)


@torch.no_grad()
def reestimate_bn(backbone: torch.nn.Module, data: ImageSet, *, images: int, batch_size: int = 250, seed: int = 0,
                  cutout_size: int = 0, forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """Reset every BN's running statistics in ``backbone`` and re-estimate them, as a cumulative average,
    on ``images`` training images (all of them when there are fewer) passed through ``forward`` (default:
    the backbone itself). The images are augmented as the weights were trained (crop and flip, plus Cutout
    of ``cutout_size``): statistics of clean images do not match weights trained on augmented ones."""
    if images < 1 or len(data) == 0:
        raise ValueError(f"BN recalibration needs images: asked for {images} of {len(data)}")
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)[:images]
    device = next(backbone.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = normalize(augment(data.images[idx], g))
            if cutout_size:
                x = cutout(x, cutout_size, g)
            backbone.train()
            (forward or backbone)(x.to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        backbone.eval()


def distillation(logits: torch.Tensor, teacher: torch.nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(teacher || student) on temperature-softened logits."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / temperature, dim=1)
    student = F.log_softmax(logits.float() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(student, target, log_target=True, reduction="batchmean")


def bn_l1_subgradient(model: torch.nn.Module, strength: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.weight.grad is not None:
            m.weight.grad.add_(strength * torch.sign(m.weight.detach()))


def train_backbone(cfg: BackboneConfig, run_dir: str | Path) -> Path:
    """Train (or resume) S1; returns the path of the backbone checkpoint."""
    cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))  # one run, however the path is spelled
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if any(isinstance(r, bool) or not isinstance(r, int) or not 0 < r < cfg.epochs for r in cfg.restarts) \
            or (cfg.restarts and cfg.schedule != "cosine"):
        raise ValueError(f"restarts {cfg.restarts} must be whole epochs inside (0, {cfg.epochs}) of a cosine schedule")
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if not 0 <= cfg.drop_units < 1:
        raise ValueError(f"drop_units must be in [0, 1), got {cfg.drop_units}")
    if cfg.average_from is not None and (isinstance(cfg.average_from, bool) or not isinstance(cfg.average_from, int)
                                         or not 0 <= cfg.average_from < cfg.epochs or cfg.average_bn_images < 1):
        raise ValueError(f"average_from must be an epoch in [0, {cfg.epochs}) (or None: no averaging) and "
                         f"average_bn_images >= 1, got {cfg.average_from!r} and {cfg.average_bn_images}")
    check_cutout(cfg.cutout)
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {cfg.compile_mode!r}")
    device = pick_device(cfg.device)
    run = RunDir(run_dir, "backbone")
    init = GatedModel.load(resolve_checkpoint(cfg.init)).backbone if cfg.init else None
    if cfg.grow:
        if init is None:
            raise ValueError("grow needs init: the checkpoint to deepen")
        init = grow(init, cfg.grow)
    extended = run.check_config(cfg, {"init_weights": weights_digest(init.state_dict())} if init is not None else None,
                                continues=continues_schedule)
    finished = run.path / "backbone.safetensors"
    if extended is not None and finished.exists():  # no longer this run's output; kept under its epochs
        finished.replace(run.path / f"backbone-{extended['epochs']}ep.safetensors")
        (run.path / "backbone-summary.json").unlink(missing_ok=True)
    train, val = load_split(cfg)

    torch.manual_seed(cfg.seed)
    if init is not None:
        model: ResidualBackbone = init.train().to(device)
    else:
        model = build_backbone(ArchSpec(cfg.arch, num_classes=len(train.classes))).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if cfg.keep_zeros and not cfg.init:
        raise ValueError("keep_zeros needs init: the checkpoint whose zero weights stay zero")
    # from the init weights, before any resume: the same masks whatever epoch we restart at
    masks = {n: p != 0 for n, p in model.named_parameters() if p.ndim > 1} if cfg.keep_zeros else {}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    use_amp = use_bf16(device, cfg.amp)

    # the compiled forward shares `model`'s parameters: state dicts stay those of `model`
    def paths_forward(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # training only: every unit runs for the whole batch and its output is selected per image
        return execute(model, x, keep, execution="mask")

    train_forward = paths_forward if cfg.drop_units else model
    forward = torch.compile(train_forward, mode=cfg.compile_mode) if cfg.compile else train_forward
    teacher = None
    if cfg.teacher and cfg.distill:
        teacher = GatedModel.load(resolve_checkpoint(cfg.teacher)).backbone.eval().requires_grad_(False).to(device, memory_format=fmt)

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> BatchResult:
        x = normalize(augment(train.images[idx], g))
        if cfg.cutout:
            x = cutout(x, cfg.cutout, g)
        x = x.to(device, memory_format=fmt)
        y = train.labels[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            if cfg.drop_units:  # drawn after the augmentation, from the same generator
                logits = forward(x, draw_paths(len(idx), model.num_units, cfg.drop_units, g).to(device))
            else:
                logits = forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if teacher is not None:
                loss = (1 - cfg.distill) * loss + cfg.distill * distillation(logits, teacher, x, cfg.temperature)
        return loss, {"train_top1": (logits.argmax(1) == y).sum()}

    @torch.no_grad()
    def hold_zeros() -> None:
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])

    def validate(epoch: int, average: Optional[AveragedModel]) -> dict:
        record = {"val_top1": evaluate(model, val, device=device), "lr": opt.param_groups[0]["lr"]}
        if average is not None:
            reestimate_bn(average.module, train, images=cfg.average_bn_images, seed=cfg.seed, cutout_size=cfg.cutout)
            record["average_val_top1"] = evaluate(average.module, val, device=device)
        return record

    loop = Loop(name=f"S1 {model.spec.name}", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                state_key="model", average_from=cfg.average_from, restarts=cfg.restarts)
    average = train_epochs(loop, run, model, opt, len(train), batch=batch_loss,
                           schedule=lambda step: {"lr": lr_at(cfg, step, steps_per_epoch)},
                           before_step=(lambda: bn_l1_subgradient(model, cfg.bn_l1)) if cfg.bn_l1 else None,
                           after_step=hold_zeros if masks else None, end_of_epoch=validate)

    if average is not None:  # its BN statistics were re-estimated after the last update
        model = average.module
    model = model.to(memory_format=torch.contiguous_format).cpu()
    card = ModelCard(arch=model.spec.to_dict(), class_names=train.classes, input_size=(3, 32, 32),
                     mean=CIFAR_MEAN, std=CIFAR_STD, info={"stage": "S1", "config": cfg.__dict__})
    out = run.path / "backbone.safetensors"
    GatedModel(model, card=card).save(out)
    val_top1 = evaluate(model, val)
    run.write_summary({"checkpoint": str(out), "val_top1": val_top1, "epochs": cfg.epochs})
    return out
