"""``skipserve bench engine``: wall-clock of full vs gated execution with random per-image decisions.

Per (batch, skip fraction), each image skips ``round(fraction * n)`` units drawn at
random, a different draw per image, so a batch mixes paths the way served traffic
does. Alongside full and gated (really skipping) we time masked execution, what the
research peers do, to show it saves nothing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from benchmarks.common import interleaved_medians, machine_info
from gating.backbones import build_backbone
from gating.executor import execute
from gating.flops import profile_backbone
from gating.fuse import fuse_bn
from gating.runtime import keep_activations_on_heap


@dataclass
class EngineBenchConfig:
    arch: str = "resnet56"  # registered backbone
    threads: int = 2  # torch intra-op threads, fixed for the run
    batches: tuple[int, ...] = (1, 64)
    skip_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    draws: int = 8  # distinct random decision sets per setting, cycled through the repeats
    repeats_b1: int = 80
    repeats_large: int = 12
    seed: int = 0
    fuse_bn: bool = True  # time the inference configuration: BN folded into convs (all modes alike)
    channels_last: bool = True  # the layout served inference uses (GatedModel.for_inference), all modes alike
    heap_allocator: bool = True  # glibc thresholds as the server sets them (gating.runtime); process-wide


def random_keep(batch: int, n: int, skip: int, g: torch.Generator) -> torch.Tensor:
    """(batch, n) bool with exactly ``skip`` False per row, positions drawn per image."""
    order = torch.rand(batch, n, generator=g).argsort(1)
    keep = torch.ones(batch, n, dtype=torch.bool)
    return keep.scatter_(1, order[:, :skip], False)


def run(cfg: EngineBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    heap = keep_activations_on_heap() if cfg.heap_allocator else False
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch).eval()
    if cfg.fuse_bn:
        backbone = fuse_bn(backbone)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=layout)
    profile = profile_backbone(backbone)
    n = backbone.num_units
    results = []
    for batch in cfg.batches:
        x = torch.randn(batch, *backbone.input_size, generator=g).contiguous(memory_format=layout)
        repeats = cfg.repeats_b1 if batch == 1 else cfg.repeats_large
        for fraction in cfg.skip_fractions:
            draws = [random_keep(batch, n, round(fraction * n), g) for _ in range(cfg.draws)]

            def gated(execution: str):
                calls = itertools.count()  # each execution cycles through every draw, as flops_ratio averages

                def go():
                    return execute(backbone, x, draws[next(calls) % len(draws)], execution)
                return go

            with torch.inference_mode():
                ms = interleaved_medians({"full": lambda: backbone(x), "gated": gated("skip"),
                                          "masked": gated("mask")},
                                         warmup=max(2, repeats // 10), repeats=repeats)
            flops_ratio = float(torch.stack([profile.executed(k) for k in draws]).mean() / profile.full)
            speedup = ms["full"] / ms["gated"]
            results.append({
                "batch": batch, "skip_fraction": fraction,
                "full_ms": round(ms["full"], 3), "gated_ms": round(ms["gated"], 3),
                "masked_ms": round(ms["masked"], 3), "flops_ratio": round(flops_ratio, 4),
                "speedup": round(speedup, 3), "ideal_speedup": round(1 / flops_ratio, 3),
                "efficiency": round(speedup * flops_ratio, 3),
                "masked_speedup": round(ms["full"] / ms["masked"], 3),
            })
    return {"benchmark": "engine", "arch": cfg.arch, "units": n, "fuse_bn": cfg.fuse_bn,
            "channels_last": cfg.channels_last, "heap_allocator": heap, "full_flops": profile.full,
            "machine": machine_info(), "results": results}
