"""``skipserve bench prune``: every static pruner at one FLOPs ratio, plus Torch-Pruning as an outside baseline.

Speedups are measured in this run on this CPU against the unpruned model, BN folded into
the convolutions for both (the inference configuration), interleaved medians.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import interleaved_medians, machine_info
from gating.backbones import ResidualBackbone
from gating.fuse import fuse_bn
from gating.model import GatedModel
from gating.zoo import resolve_checkpoint
from training.backbone import BackboneConfig, evaluate, load_split
from training.pruning.run import METHODS, finetune_pruned, iterative_magnitude, prune_backbone, validate


@dataclass
class PruneBenchConfig:
    checkpoint: str = "default-backbone"  # unpruned S1 backbone
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    ratio: float = 0.5  # fraction of backbone FLOPs to remove
    finetune_epochs: int = 0
    methods: tuple[str, ...] = tuple(METHODS) + ("torch-pruning",)
    threads: int = 2
    repeats_b1: int = 40
    repeats_b64: int = 8
    seed: int = 0


def torch_pruning_baseline(backbone: ResidualBackbone, ratio: float, full_flops: int) -> ResidualBackbone:
    """Torch-Pruning's MagnitudePruner (L1) on the same residual-safe scope: inner channels only.

    Its dependency graph cannot follow option-A shortcuts (zero-padded channels), so the
    stem, every conv2's outputs and the classifier are left out, as our pruners leave them.
    """
    import torch_pruning as tp

    from gating.flops import profile_backbone

    pruned = copy.deepcopy(backbone).eval()
    profile = profile_backbone(pruned)
    channel_ratio = ratio * full_flops / sum(profile.unit_run)
    ignored = [pruned.stem[0], pruned.head[-1]] + [u.conv2 for u in pruned.units]
    pruner = tp.pruner.MagnitudePruner(pruned, torch.zeros(1, *pruned.input_size),
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=channel_ratio, ignored_layers=ignored)
    pruner.step()
    pruned.spec = replace(pruned.spec, inner_widths=tuple(u.conv1.out_channels for u in pruned.units))
    return pruned


def _speedups(base: ResidualBackbone, pruned: ResidualBackbone, cfg: PruneBenchConfig) -> dict:
    a, b = fuse_bn(base), fuse_bn(pruned)
    out = {}
    for batch, repeats in ((1, cfg.repeats_b1), (64, cfg.repeats_b64)):
        x = torch.randn(batch, *base.input_size)
        with torch.inference_mode():
            ms = interleaved_medians({"base": lambda: a(x), "pruned": lambda: b(x)}, warmup=3, repeats=repeats)
        out[f"speedup_b{batch}"] = round(ms["base"] / ms["pruned"], 3)
    return out


def run(cfg: PruneBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    path = resolve_checkpoint(cfg.checkpoint)
    for method in cfg.methods:
        if method != "torch-pruning":
            validate(method, cfg.ratio, path)  # fail before any work
    model = GatedModel.load(path)
    s1 = model.card.info.get("config") or {}
    data_cfg = BackboneConfig(data=cfg.data, val_fraction=float(s1.get("val_fraction", 0.1)),
                              split_seed=int(s1.get("split_seed", 0)))
    train, val = load_split(data_cfg)
    base = model.backbone.eval()
    base_params = sum(p.numel() for p in base.parameters())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in cfg.methods:
            t0 = time.perf_counter()
            if method == "torch-pruning":
                pruned, extra = torch_pruning_baseline(base, cfg.ratio, model.flops.full), {}
            else:
                pruned, extra = prune_backbone(method, cfg.ratio, base, train, seed=cfg.seed)
            seconds = time.perf_counter() - t0
            pruned_model = GatedModel(pruned, card=model.card)
            entry = {"method": method, "params": sum(p.numel() for p in pruned.parameters()),
                     "flops": pruned_model.flops.full, "flops_ratio": round(pruned_model.flops.full / model.flops.full, 4),
                     "seconds": round(seconds, 2), "top1_before_finetune": evaluate(pruned, val), **extra}
            if method != "magnitude":
                entry.update(_speedups(base, pruned, cfg))
            if cfg.finetune_epochs and method == "magnitude":
                tuned, final = iterative_magnitude(model, cfg.ratio, train, data_cfg, cfg.finetune_epochs,
                                                   str(Path(tmp) / "magnitude.safetensors"),
                                                   str(Path(tmp) / "magnitude-ft"), seed=cfg.seed)
                entry.update(sparsity=final["sparsity"], csr_numbers=final["csr_numbers"],
                             top1_after_finetune=evaluate(tuned.backbone, val))
            elif cfg.finetune_epochs:
                tuned = finetune_pruned(pruned_model, replace(data_cfg, channels_last=True), cfg.finetune_epochs,
                                        str(Path(tmp) / f"{method}.safetensors"), str(Path(tmp) / f"{method}-ft"),
                                        cfg.seed)
                entry["top1_after_finetune"] = evaluate(tuned.backbone, val)
            results.append(entry)
    return {"benchmark": "prune", "checkpoint": cfg.checkpoint, "ratio": cfg.ratio,
            "finetune_epochs": cfg.finetune_epochs, "unpruned": {"params": base_params, "flops": model.flops.full,
                                                                 "top1": evaluate(base, val)},
            "machine": machine_info(), "results": results}
