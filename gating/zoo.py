"""Shipped models, found by name; anything else is a checkpoint path."""
from __future__ import annotations

import os
from pathlib import Path

from gating.checkpoint import CheckpointError

WEIGHTS_DIR = Path(__file__).parent / "weights"

# name -> (file under gating/weights, what it is)
SHIPPED = {
    "default": ("default.safetensors", "gated CIFAR-10 ResNet at its shipped knob"),
    "default-backbone": ("default-backbone.safetensors", "the S1 backbone the default model started from (policy full)"),
}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's file, or the given path; raises ``CheckpointError`` when it is not there."""
    key = str(name_or_path)
    if key in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[key][0]
        if not path.exists():
            raise CheckpointError(path, f"the shipped model {key!r} ({SHIPPED[key][1]}) is not in this "
                                        "installation yet: no trained default model exists. Train one with "
                                        "`skipserve pipeline --config training/recipes/default.yaml`, or pass "
                                        "--checkpoint PATH")
        return path
    path = Path(key)
    if not path.exists():
        raise CheckpointError(path, f"no such checkpoint file (shipped names: {', '.join(SHIPPED)})")
    return path
