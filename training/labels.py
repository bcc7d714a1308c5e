"""S3: importance labels imp(x, i) = loss(M without unit i, x) - loss(M, x).

Removing unit i changes nothing before unit i, so the cached method runs the full
model once, keeps every unit's input, and for each i replays only units i+1..n-1
from unit i's skipped output: about n + n(n-1)/2 unit evaluations instead of the
naive n(n-1) + n, whose results it matches to float tolerance.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gating.backbones import ResidualBackbone
from gating.checkpoint import CheckpointError, atomic_write
from training.data import ImageSet, batches, normalize


@torch.inference_mode()
def importance_naive(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, n): one full forward pass per removed unit, straight from the definition."""
    base = F.cross_entropy(backbone(x), y, reduction="none")
    out = []
    for i in range(backbone.num_units):
        h = backbone.stem(x)
        for j, unit in enumerate(backbone.units):
            h = unit.skip(h) if j == i else unit(h)
        out.append(F.cross_entropy(backbone.head(h), y, reduction="none") - base)
    return torch.stack(out, 1)


@torch.inference_mode()
def importance_cached(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, n): replay only the units after i, from unit i's cached input."""
    inputs, logits = backbone.unit_inputs(x)  # n x (B, C_i, H_i, W_i)
    base = F.cross_entropy(logits, y, reduction="none")
    units = backbone.units
    out = []
    for i in range(backbone.num_units):
        h = units[i].skip(inputs[i])
        for unit in units[i + 1:]:
            h = unit(h)
        out.append(F.cross_entropy(backbone.head(h), y, reduction="none") - base)
    return torch.stack(out, 1)


@dataclass
class LabelConfig:
    batch_size: int = 250  # images per forward pass


def label_dataset(backbone: ResidualBackbone, data: ImageSet, cfg: LabelConfig = LabelConfig(),
                  method=importance_cached) -> torch.Tensor:
    """(N, n) float32 importance of every unit for every image of ``data`` (no augmentation)."""
    backbone.eval()
    device = next(backbone.parameters()).device
    rows = []
    for idx in tqdm(list(batches(len(data), cfg.batch_size)), desc="S3 labels", unit="batch", leave=False):
        x = normalize(data.images[idx]).to(device)
        rows.append(method(backbone, x, data.labels[idx].to(device)).float().cpu())
    return torch.cat(rows)


def save_labels(path: os.PathLike | str, imp: torch.Tensor, *, source: str, num_units: int) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({"importance": imp.contiguous()}, tmp,
                                             metadata={"source": source, "num_units": str(num_units)}))


def load_labels(path: os.PathLike | str, *, num_images: int, num_units: int) -> torch.Tensor:
    """Load and check an (N, n) label file; bad files raise ``CheckpointError`` naming the problem."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such label file")
    try:
        with safe_open(path, framework="pt") as f:
            imp = f.get_tensor("importance")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(path, f"not a readable label file (truncated or corrupt?): {err}") from err
    if tuple(imp.shape) != (num_images, num_units):
        raise CheckpointError(path, f"labels are {tuple(imp.shape)}, expected (images, units) = "
                                    f"({num_images}, {num_units}): made for another model or split?")
    if not torch.isfinite(imp).all():
        raise CheckpointError(path, "labels contain NaN or infinite values")
    return imp


def bench_labels(backbone: ResidualBackbone, data: ImageSet, *, images: int = 500, batch_size: int = 250) -> dict:
    """Time naive vs cached labelling on the same images; both must agree."""
    subset = data.subset(torch.arange(min(images, len(data))))
    cfg = LabelConfig(batch_size=batch_size)
    label_dataset(backbone, subset.subset(torch.arange(min(batch_size, len(subset)))), cfg)  # warm-up
    t0 = time.perf_counter()
    naive = label_dataset(backbone, subset, cfg, method=importance_naive)
    t1 = time.perf_counter()
    cached = label_dataset(backbone, subset, cfg, method=importance_cached)
    t2 = time.perf_counter()
    return {"images": len(subset), "units": backbone.num_units, "naive_s": round(t1 - t0, 3),
            "cached_s": round(t2 - t1, 3), "speedup": round((t1 - t0) / (t2 - t1), 3),
            "max_abs_diff": float((naive - cached).abs().max())}


def labels_path(run_dir: os.PathLike | str, round_index: int) -> Path:
    return Path(run_dir) / f"labels-round{round_index}.safetensors"
