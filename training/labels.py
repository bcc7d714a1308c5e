"""S3: importance labels imp(x, i) = loss(M without unit i, x) - loss(M, x).

Removing unit i changes nothing before unit i, so the cached method runs the full
model once, keeps every unit's input, and for each i replays only units i+1..n-1
from unit i's skipped output: about n + n(n-1)/2 unit evaluations instead of the
naive n(n-1) + n, whose results it matches to float tolerance.

Rounds after the first label on each image's gated path instead (``decide``): imp(x, i) =
loss(path without i) - loss(path with i), removing i where the path runs it and adding it
where it does not. On the full path this is the definition above.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gating.backbones import ResidualBackbone
from gating.checkpoint import CheckpointError, atomic_write
from gating.executor import mask_unit
from training.data import ImageSet, batches, normalize


def _unit(unit, h: torch.Tensor, on: Optional[torch.Tensor]) -> torch.Tensor:
    """Unit output where ``on`` (B,) is True, its shortcut elsewhere; ``on`` None = every image runs it.

    Labelling is offline and must replay B different paths in one batch, so it uses the masked
    execution; serving never does this (the executor runs each unit on its own images only).
    """
    return unit(h) if on is None else mask_unit(unit, h, on)


def _flipped(unit, h: torch.Tensor, on: Optional[torch.Tensor]) -> torch.Tensor:
    """The unit toggled: removed where the path runs it, added where it does not."""
    return unit.skip(h) if on is None else _unit(unit, h, ~on)


def _column(keep: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    return None if keep is None else keep[:, i]


def _path_loss(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor],
               toggle: Optional[int] = None) -> torch.Tensor:
    """(B,) loss of each image on its path (every unit if ``keep`` is None), with unit ``toggle`` flipped."""
    h = backbone.stem(x)
    for j, unit in enumerate(backbone.units):
        on = _column(keep, j)
        h = _flipped(unit, h, on) if j == toggle else _unit(unit, h, on)
    return F.cross_entropy(backbone.head(h), y, reduction="none")


def _difference(toggled: torch.Tensor, base: torch.Tensor, on: Optional[torch.Tensor]) -> torch.Tensor:
    """loss(path without i) - loss(path with i): toggling removed i where the path ran it, added it elsewhere."""
    return toggled - base if on is None else torch.where(on, toggled - base, base - toggled)


@torch.inference_mode()
def importance_naive(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor,
                     keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, n) straight from the definition, one whole forward pass per unit:
    loss(path without unit i) - loss(path with unit i), where the path is every unit (``keep`` None:
    the patent's imp(x, i) = loss(M without i) - loss(M)) or each image's own (B, n) ``keep``."""
    base = _path_loss(backbone, x, y, keep)
    return torch.stack([_difference(_path_loss(backbone, x, y, keep, toggle=i), base, _column(keep, i))
                        for i in range(backbone.num_units)], 1)


@torch.inference_mode()
def importance_cached(backbone: ResidualBackbone, x: torch.Tensor, y: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, n), the same numbers: run the path once caching each unit's input, then toggle unit i
    (remove it if the path runs it, add it if not) and replay only the units after i."""
    inputs, h = [], backbone.stem(x)
    for j, unit in enumerate(backbone.units):
        inputs.append(h)
        h = _unit(unit, h, _column(keep, j))
    base = F.cross_entropy(backbone.head(h), y, reduction="none")
    units = backbone.units
    out = []
    for i in range(backbone.num_units):
        on = _column(keep, i)
        h = _flipped(units[i], inputs[i], on)
        for j in range(i + 1, backbone.num_units):
            h = _unit(units[j], h, _column(keep, j))
        out.append(_difference(F.cross_entropy(backbone.head(h), y, reduction="none"), base, on))
    return torch.stack(out, 1)


@dataclass
class LabelConfig:
    batch_size: int = 250  # images per forward pass


def label_dataset(backbone: ResidualBackbone, data: ImageSet, cfg: LabelConfig = LabelConfig(),
                  method=importance_cached, *, decide: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                  ) -> torch.Tensor:
    """(N, n) float32 importance of every unit for every image of ``data`` (no augmentation).

    ``decide`` maps a batch to its (B, n) keep mask (a gated model's ``decide``): importance is then
    measured on each image's own path: a backbone finetuned for gated paths is no longer the
    network its full path (every unit) describes.
    """
    backbone.eval()
    device = next(backbone.parameters()).device
    rows = []
    for idx in tqdm(list(batches(len(data), cfg.batch_size)), desc="S3 labels", unit="batch", leave=False):
        x = normalize(data.images[idx]).to(device)
        keep = None if decide is None else decide(x).to(device)
        rows.append(method(backbone, x, data.labels[idx].to(device), keep).float().cpu())
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
