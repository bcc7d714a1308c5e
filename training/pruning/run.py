"""``skipserve prune``: one method, one ratio, a checkpoint in, a thinner checkpoint out."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from gating.checkpoint import CheckpointError, load_tensors
from gating.model import GatedModel
from training.backbone import BackboneConfig, evaluate, load_split, train_backbone
from training.data import normalize
from training.pruning.criteria import CRITERIA
from training.pruning.ista import IstaConfig, ista_train, remove_zero_gamma
from training.pruning.magnitude import magnitude_prune
from training.pruning.pruner import ChannelPruner

METHODS = CRITERIA.names() + ["ista", "magnitude"]


def validate(method: str, ratio: float, checkpoint: str) -> None:
    """Every check that needs no work: runs before any data is read or model is touched."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    _, card = load_tensors(checkpoint)
    if card.gate is not None:
        raise CheckpointError(checkpoint, "is a gated model; prune its backbone (an S1 checkpoint) before gates "
                                          "are trained")
    if not card.arch["name"].startswith("resnet") or card.arch["name"] in ("resnet18", "resnet34", "resnet50"):
        raise CheckpointError(checkpoint, f"architecture {card.arch['name']} is not a CIFAR ResNet")


def prune_checkpoint(method: str, ratio: float, checkpoint: str, data: str, out: str, *,
                     finetune_epochs: int = 0, sample_images: int = 256, seed: int = 0,
                     run_dir: Optional[str] = None) -> dict:
    validate(method, ratio, checkpoint)
    model = GatedModel.load(checkpoint)
    s1 = model.card.info.get("config") or {}
    cfg = BackboneConfig(data=data, val_fraction=float(s1.get("val_fraction", 0.1)),
                         split_seed=int(s1.get("split_seed", 0)))
    train, val = load_split(cfg)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=g)[:sample_images]
    x, y = normalize(train.images[pick]), train.labels[pick]
    t0 = time.perf_counter()
    backbone = model.backbone.eval()
    report: dict = {"method": method, "ratio": ratio}
    if method == "magnitude":
        result = magnitude_prune(backbone, ratio, x, y)
        report.update(sparsity=result["sparsity"], csr_numbers=result["csr_numbers"],
                      dense_numbers=result["dense_numbers"],
                      note="unstructured sparsity: smaller in CSR storage, not faster with dense kernels")
        pruned = backbone
    elif method == "ista":  # ISTA-train gamma, then drop the smallest |gamma| (the zeros first) to meet the ratio
        backbone = ista_train(backbone.train(), train, IstaConfig(seed=seed))
        keep = ChannelPruner(CRITERIA.get("slimming")(), ratio).select(backbone, None)
        pruned = remove_zero_gamma(backbone, keep)
        report["zero_gamma_channels"] = sum(int((u.bn1.weight == 0).sum()) for u in backbone.units)
    else:
        pruned = ChannelPruner(CRITERIA.get(method)(), ratio).prune(backbone, x)
    report["seconds"] = time.perf_counter() - t0
    report["top1_before_finetune"] = evaluate(pruned, val)
    result_model = GatedModel(pruned, card=replace(model.card, info={**model.card.info, "pruned": report}))
    result_model.save(out)
    if finetune_epochs:
        if method == "magnitude":
            raise ValueError("magnitude: masked retraining is not wired into finetuning yet; use --finetune-epochs 0")
        ft = replace(cfg, init=str(out), epochs=finetune_epochs, lr=0.02, warmup_epochs=0.0, seed=seed,
                     data=data)
        tuned = train_backbone(ft, run_dir or str(Path(out).with_suffix("")) + "-finetune")
        tuned_model = GatedModel.load(tuned)
        report["top1_after_finetune"] = evaluate(tuned_model.backbone, val)
        tuned_model.card.info = {**tuned_model.card.info, "pruned": report}
        tuned_model.save(out)
    report["params"] = sum(p.numel() for p in pruned.parameters())
    report["flops"] = GatedModel(pruned).flops.full
    report["flops_ratio"] = report["flops"] / model.flops.full
    return report
