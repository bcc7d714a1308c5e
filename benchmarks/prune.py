"""``skipserve bench prune``: every static pruner at one FLOPs ratio, plus Torch-Pruning as an outside baseline.

Speedups are measured in this run on this CPU against the unpruned model, both in the
configuration inference runs in (BN folded into the convolutions, channels-last weights and
input, as ``GatedModel.for_inference``, and the allocator settings of ``gating.runtime``).
Every model is timed in several fresh processes, all models interleaved in each, and a
speedup is the median over processes of base ms / pruned ms: a model's time varies from
one process to another with the allocator's history (see ``gating.runtime``).
"""
from __future__ import annotations

import copy
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, machine_info
from gating.backbones import ArchSpec, ResidualBackbone, build_backbone
from gating.model import GatedModel
from gating.runtime import keep_activations_on_heap
from gating.zoo import resolve_checkpoint
from training.backbone import BackboneConfig, evaluate, load_split
from training.data import card_split
from training.pruning.run import METHODS, finetune_after_pruning, prune_backbone, validate


@dataclass
class PruneBenchConfig:
    checkpoint: str = "default-backbone"  # unpruned S1 backbone
    data: str = "../shared/data/cifar10-train-jpeg.tar.gz"
    ratio: float = 0.5  # fraction of backbone FLOPs to remove
    finetune_epochs: int = 0
    methods: tuple[str, ...] = tuple(METHODS) + ("torch-pruning",)
    threads: int = 2
    repeats_b1: int = 40
    repeats_b64: int = 20
    timing_processes: int = 5  # fresh processes the speedups are the median over
    stages: bool = False  # channel methods also thin the stage streams (ChannelPruner.stages)
    allocation: str = "sensitivity"  # inner widths per unit (ChannelPruner.allocation)
    align: int = 16  # sensitivity: widths in multiples of this
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


def _time_in_this_process(models: dict[str, tuple[dict, dict]], threads: int, repeats_b1: int,
                          repeats_b64: int) -> dict[str, dict[int, float]]:
    """Median ms per model and batch size; ``models`` maps a name to (ArchSpec dict, state dict)."""
    torch.set_num_threads(threads)
    keep_activations_on_heap()  # as the server runs (gating.runtime)
    ready = {}
    for name, (arch, state) in models.items():
        m = build_backbone(ArchSpec.from_dict(arch))
        m.load_state_dict(state)
        ready[name] = GatedModel(m).for_inference().backbone  # BN folded, channels-last, as served
    size = next(iter(ready.values())).input_size
    out: dict[str, dict[int, float]] = {name: {} for name in ready}
    for batch, repeats in ((1, repeats_b1), (64, repeats_b64)):
        x = torch.randn(batch, *size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ms = interleaved_medians({k: (lambda m=m: m(x)) for k, m in ready.items()}, warmup=3, repeats=repeats)
        for name, value in ms.items():
            out[name][batch] = value
    return out


def speedups(base: ResidualBackbone, pruned: dict[str, ResidualBackbone], cfg: PruneBenchConfig) -> dict[str, dict]:
    """Per pruned model: ``speedup_b1``, ``speedup_b64`` (medians over fresh processes) and the per-process b64 ones."""
    models = {name: (m.spec.to_dict(), m.state_dict()) for name, m in {"unpruned": base, **pruned}.items()}
    runs = []
    for _ in range(cfg.timing_processes):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(_time_in_this_process, models, cfg.threads, cfg.repeats_b1,
                                    cfg.repeats_b64).result())
    out = {}
    for name in pruned:
        ratios = {b: [r["unpruned"][b] / r[name][b] for r in runs] for b in (1, 64)}
        out[name] = {"speedup_b1": round(statistics.median(ratios[1]), 3),
                     "speedup_b64": round(statistics.median(ratios[64]), 3),
                     "speedup_b64_per_process": [round(v, 3) for v in ratios[64]]}
    return out


def run(cfg: PruneBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    path = resolve_checkpoint(cfg.checkpoint)
    for method in cfg.methods:
        if method != "torch-pruning":
            validate(method, cfg.ratio, path, allocation=cfg.allocation, align=cfg.align)  # fail before any work
    model = GatedModel.load(path)
    fraction, split_seed = card_split(model.card)
    data_cfg = BackboneConfig(data=cfg.data, val_fraction=fraction, split_seed=split_seed)
    train, val = load_split(data_cfg)
    base = model.backbone.eval()
    base_params = sum(p.numel() for p in base.parameters())
    results, to_time = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in cfg.methods:
            t0 = time.perf_counter()
            if method == "torch-pruning":
                pruned, extra = torch_pruning_baseline(base, cfg.ratio, model.flops.full), {}
            else:
                pruned, extra = prune_backbone(method, cfg.ratio, base, train, seed=cfg.seed, stages=cfg.stages,
                                               allocation=cfg.allocation, align=cfg.align)
            seconds = time.perf_counter() - t0
            pruned_model = GatedModel(pruned, card=model.card)
            flops = pruned_model.flops.full
            entry = {"method": method, "params": sum(p.numel() for p in pruned.parameters()),
                     "flops": flops, "flops_ratio": round(flops / model.flops.full, 4),
                     "seconds": round(seconds, 2), "top1_before_finetune": evaluate(pruned, val), **extra}
            if method != "magnitude":
                to_time[method] = pruned
            if cfg.finetune_epochs:
                tuned, final = finetune_after_pruning(
                    method, model, pruned_model, cfg.ratio, train, replace(data_cfg, channels_last=True),
                    cfg.finetune_epochs, str(Path(tmp) / f"{method}.safetensors"), str(Path(tmp) / f"{method}-ft"),
                    seed=cfg.seed, teacher=str(path))
                entry.update({k: final[k] for k in ("sparsity", "csr_numbers") if k in final},
                             top1_after_finetune=evaluate(tuned.backbone, val))
            results.append(entry)
    timed = speedups(base, to_time, cfg)
    for entry in results:
        entry.update(timed.get(entry["method"], {}))
    return {"benchmark": "prune", "checkpoint": cfg.checkpoint, "ratio": cfg.ratio,
            "finetune_epochs": cfg.finetune_epochs, "timing_processes": cfg.timing_processes, "stages": cfg.stages,
            "allocation": cfg.allocation, "align": cfg.align,
            "unpruned": {"params": base_params, "flops": model.flops.full, "top1": evaluate(base, val)},
            "machine": machine_info(), "results": results}
