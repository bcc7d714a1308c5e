"""Shipped models, found by name; anything else is a checkpoint path.

Each entry is data, as torchvision's weights metadata: the file under gating/weights, its sha256, the
recipe that makes it (``skipserve pipeline --config RECIPE``, stage ``stage``) and its validation figures.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from gating.checkpoint import CheckpointError
from gating.registry import Registry

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Weights:
    file: str  # under gating/weights
    sha256: str  # of the file; checked by the test suite
    description: str
    recipe: str  # the recipe under training/recipes that makes it, relative to the repository
    stage: str  # the recipe's stage whose output it is
    # validation split of the recipe's data: top1, flops (per image, gate counted), flops_ratio (against
    # the uncut backbone), distinct_paths
    metrics: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


ZOO: Registry[Weights] = Registry("shipped model")
RECIPE = "training/recipes/default.yaml"
ZOO.register("default")(Weights(
    "default.safetensors", "5c8744ea9d1bbe2eb242ce87a6749d09311e6d95aa2fae626bed6af5fb0c3532",
    "CIFAR-10 ResNet-32 cut to 9 of 15 units; a ResNet-8 gate skips one more unit for easy images", RECIPE, "knob",
    {"top1": 0.9088, "flops": 81998909, "flops_ratio": 0.5954, "distinct_paths": 2}))
ZOO.register("default-backbone")(Weights(
    "default-backbone.safetensors", "2be666419f9d5dd2795acd3e19b5c9badd6b3d5384af7cbbbe60716f96fe02dc",
    "CIFAR-10 ResNet-32 (15 units), every unit run: the backbone `default` is cut from", RECIPE, "swa",
    {"top1": 0.913, "flops": 137725184, "flops_ratio": 1.0, "distinct_paths": 1}))


def sha256_of(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's file, or the given path; raises ``CheckpointError`` when it is not there."""
    key = str(name_or_path)
    if key in ZOO:
        weights = ZOO.get(key)
        if not weights.path.exists():
            raise CheckpointError(weights.path, f"the shipped model {key!r} ({weights.description}) is missing "
                                                f"from this installation; `skipserve pipeline --config "
                                                f"{weights.recipe}` makes it, or pass --checkpoint PATH")
        return weights.path
    path = Path(key)
    if not path.exists():
        raise CheckpointError(path, f"no such checkpoint file (shipped names: {', '.join(ZOO)})")
    return path
