"""``skipserve prune``: one method, one ratio, a checkpoint in, a thinner checkpoint out."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from gating.checkpoint import CheckpointError, load_tensors
from gating.backbones import ResidualBackbone
from gating.model import GatedModel
from gating.zoo import resolve_checkpoint
from training.backbone import BackboneConfig, evaluate, load_split, train_backbone
from training.data import ImageSet, card_split, normalize
from training.pruning.criteria import CRITERIA
from training.pruning.ista import IstaConfig, ista_train, remove_zero_gamma
from training.pruning.magnitude import MAX_LAYER_SPARSITY, magnitude_prune
from training.pruning.pruner import ALLOCATIONS, ChannelPruner
from training.run import RunError

METHODS = CRITERIA.names() + ["ista", "magnitude"]
DISTILL = 0.7  # finetuning's weight on imitating the unpruned model (the default recipe's S5 value)


def validate(method: str, ratio: float, checkpoint: str, *, allocation: str = "sensitivity", align: int = 16) -> None:
    """Every check that needs no work: runs before any data is read or model is touched."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    if method == "magnitude" and ratio > MAX_LAYER_SPARSITY:
        raise ValueError(f"--ratio {ratio}: magnitude pruning leaves every layer at least "
                         f"{1 - MAX_LAYER_SPARSITY:.0%} of its weights, so at most {MAX_LAYER_SPARSITY}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown --allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if align < 1:
        raise ValueError(f"--align must be >= 1, got {align}")
    _, card = load_tensors(checkpoint)
    if card.gate is not None:
        raise CheckpointError(checkpoint, "is a gated model; prune its backbone (an S1 checkpoint) before gates "
                                          "are trained")
    if not card.arch["name"].startswith("resnet") or card.arch["name"] in ("resnet18", "resnet34", "resnet50"):
        raise CheckpointError(checkpoint, f"architecture {card.arch['name']} is not a CIFAR ResNet")


def prune_backbone(method: str, ratio: float, backbone: ResidualBackbone, train: ImageSet, *,
                   sample_images: int = 256, seed: int = 0, stages: bool = False,
                   allocation: str = "sensitivity", align: int = 16) -> tuple[ResidualBackbone, dict]:
    """Prune a copy of ``backbone``; returns it and what the method reports (magnitude: sparsity, CSR size)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=g)[:sample_images]
    x, y = normalize(train.images[pick]), train.labels[pick]
    backbone = copy.deepcopy(backbone).eval()
    report: dict = {}
    if method == "magnitude":
        result = magnitude_prune(backbone, ratio, x, y)
        report.update(sparsity=result["sparsity"], csr_numbers=result["csr_numbers"],
                      dense_numbers=result["dense_numbers"],
                      note="unstructured sparsity: stored as CSR where smaller, not faster with dense kernels")
        return backbone, report
    if method == "ista":  # ISTA-train gamma, then drop the smallest |gamma| (the zeros first) to meet the ratio
        pruner = ChannelPruner(CRITERIA.get("slimming")(), ratio, stages=stages, allocation=allocation, align=align)
        if not stages:
            pruner.check_reachable(backbone)  # before the training, not after it
        backbone = ista_train(backbone.train(), train, IstaConfig(seed=seed))
        report["zero_gamma_channels"] = sum(int((u.bn1.weight == 0).sum()) for u in backbone.units)
        if stages:
            backbone, pruner = pruner.thin_stages(backbone, x)
        return remove_zero_gamma(backbone, pruner.select(backbone, x)), report
    pruner = ChannelPruner(CRITERIA.get(method)(), ratio, stages=stages, allocation=allocation, align=align)
    return pruner.prune(backbone, x), report


def finetune_pruned(model: GatedModel, cfg: BackboneConfig, epochs: int, out: str, run_dir: str,
                    seed: int = 0, keep_zeros: bool = False, teacher: Optional[str] = None) -> GatedModel:
    """Train a pruned backbone from its weights for a few epochs (cosine from lr 0.02); with ``teacher``
    (the unpruned checkpoint) the loss also distils its outputs, as S5 does for the gated model."""
    model.save(out)
    ft = replace(cfg, init=str(out), epochs=epochs, lr=0.02, warmup_epochs=0.0, seed=seed, keep_zeros=keep_zeros,
                 teacher=teacher, distill=DISTILL if teacher else 0.0)
    return GatedModel.load(train_backbone(ft, run_dir))


def iterative_magnitude(model: GatedModel, ratio: float, train: ImageSet, cfg: BackboneConfig, epochs: int,
                        out: str, run_dir: str, *, steps: int = 3, seed: int = 0) -> tuple[GatedModel, dict]:
    """Han et al.: prune to ratio * k / steps, retrain with the zeros held, for k = 1..steps."""
    steps = max(1, min(steps, epochs))
    report: dict = {}
    for k in range(1, steps + 1):
        pruned, report = prune_backbone("magnitude", ratio * k / steps, model.backbone, train, seed=seed)
        model = GatedModel(pruned, card=model.card)
        share = epochs // steps + (1 if k <= epochs % steps else 0)
        model = finetune_pruned(model, cfg, share, out, f"{run_dir}/step{k}", seed, keep_zeros=True)
    report["retrain_steps"] = steps
    return model, report


def finetune_after_pruning(method: str, unpruned: GatedModel, pruned: GatedModel, ratio: float, train: ImageSet,
                           cfg: BackboneConfig, epochs: int, out: str, run_dir: str, *, seed: int = 0,
                           teacher: Optional[str] = None) -> tuple[GatedModel, dict]:
    """The finetuned model and what the finetuning reports: magnitude prunes again in steps from
    ``unpruned`` (Han et al.); a channel method trains ``pruned``, distilling ``teacher`` when given."""
    if method == "magnitude":
        return iterative_magnitude(unpruned, ratio, train, cfg, epochs, out, run_dir, seed=seed)
    return finetune_pruned(pruned, cfg, epochs, out, run_dir, seed, teacher=teacher), {}


def prune_checkpoint(method: str, ratio: float, checkpoint: str, data: str, out: str, *,
                     finetune_epochs: int = 0, sample_images: int = 256, seed: int = 0,
                     run_dir: Optional[str] = None, stages: bool = False, allocation: str = "sensitivity",
                     align: int = 16) -> dict:
    checkpoint = str(resolve_checkpoint(checkpoint))
    validate(method, ratio, checkpoint, allocation=allocation, align=align)
    if finetune_epochs and Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} is the checkpoint being pruned: finetuning writes the pruned model there "
                         "first and (channel methods) distils from the original; write it elsewhere")
    model = GatedModel.load(checkpoint)
    fraction, split_seed = card_split(model.card)
    cfg = BackboneConfig(data=data, val_fraction=fraction, split_seed=split_seed)
    train, val = load_split(cfg)
    t0 = time.perf_counter()
    pruned, report = prune_backbone(method, ratio, model.backbone, train, sample_images=sample_images, seed=seed,
                                    stages=stages, allocation=allocation, align=align)
    report = {"method": method, "ratio": ratio, "stages": stages, "allocation": allocation, "align": align,
              **report, "seconds": time.perf_counter() - t0, "top1_before_finetune": evaluate(pruned, val)}
    result = GatedModel(pruned, card=replace(model.card, info={**model.card.info, "pruned": report}))
    run_dir = run_dir or str(Path(out).with_suffix("")) + "-finetune"
    try:
        if finetune_epochs:
            result, tuned = finetune_after_pruning(method, model, result, ratio, train, cfg, finetune_epochs, out,
                                                   run_dir, seed=seed, teacher=checkpoint)
            report.update(tuned, top1_after_finetune=evaluate(result.backbone, val))
    except RunError as err:
        raise RunError(f"{err}. {run_dir} is the finetuning run of --out {out}, left by an earlier "
                       "`skipserve prune` with other settings or other pruned weights: delete it, or write to "
                       "another --out") from None
    report["params"] = sum(p.numel() for p in result.backbone.parameters())
    report["flops"] = result.flops.full
    report["flops_ratio"] = report["flops"] / model.flops.full
    result.card.info = {**result.card.info, "pruned": report}
    result.save(out, sparse=method == "magnitude")
    report["file_bytes"] = Path(out).stat().st_size
    return report
