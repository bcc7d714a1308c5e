"""What exp.py and beta.py share: the split, and round 1's S4 ending (the pipeline's) for a new gate."""
import json
from pathlib import Path

from gating.checkpoint import atomic_write_text
from gating.model import GatedModel
from training.backbone import BackboneConfig, load_split
from training.evaluate import evaluate_gated
from training.finetune import FinetuneConfig, serve_new_gate

DATA = "../shared/data/cifar10-train-jpeg.tar.gz"


def split():
    """The 45,000 / 5,000 split every run of runs/ trained and evaluated on."""
    return load_split(BackboneConfig(data=DATA, val_fraction=0.1, split_seed=0))


def serve_at_target(model: GatedModel, train) -> GatedModel:
    """The threshold rule's alpha for 0.595 of the FLOPs on training images, then BN statistics
    re-estimated on the new paths, on images augmented as S1 trained (Cutout 16)."""
    return serve_new_gate(model, train, FinetuneConfig(policy="threshold", flops_target=0.595), cutout_size=16)


def evaluate_to(model: GatedModel, val, path: Path) -> dict:
    """`skipserve eval`'s figures on the validation split, written once, atomically."""
    figures = evaluate_gated(model, val)
    atomic_write_text(path, json.dumps(figures, indent=2) + "\n")
    return figures
