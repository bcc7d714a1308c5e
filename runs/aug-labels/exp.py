"""Experiment: S3 labels on augmented views of the training images instead of the clean images.

Why: S1 fits its clean training images (the labels' loss(M, x) is near zero for most), so
imp(x, i) measured there says little about images the model has not memorised; the round-1 gate
trained on them scores below a constant 9-unit path before S5 (0.5990 against 0.7712 on the SWA
backbone). Crop+flip views (as S1 trained, without Cutout) are images the network is less sure of.

usage: python runs/aug-labels/exp.py BACKBONE OUT_DIR VIEWS [GATE_HYPER_JSON [LABELS]]
(LABELS: an existing label file on the same views, to train another gate on them)
"""
import json
import sys
from pathlib import Path

import torch

from common import evaluate_to, serve_at_target, split
from gating.model import GatedModel
from training.data import ImageSet, augment
from training.gate import GateConfig, train_gate
from training.labels import LabelConfig, label_dataset, load_labels, save_labels
from training.run import record_stage

src, out, views = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
hyper = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {"resolution": 16}
labels = Path(sys.argv[5]) if len(sys.argv) > 5 else out / "labels.safetensors"
out.mkdir(parents=True, exist_ok=True)
train, val = split()
gated = out / "gated.safetensors"
if not gated.exists():
    g = torch.Generator().manual_seed(1234)  # the views, identical on every run: labels and gate see the same images
    aug = ImageSet(torch.cat([torch.cat([augment(train.images[i:i + 5000], g) for i in range(0, len(train), 5000)])
                              for _ in range(views)]), train.labels.repeat(views), train.classes)
    model = GatedModel.load(src)
    if not labels.exists():
        save_labels(labels, label_dataset(model.backbone, aug, LabelConfig(batch_size=250)), source=src,
                    num_units=model.num_units)
    imp = load_labels(labels, num_images=len(aug), num_units=model.num_units)
    print("label mean per unit", [round(v, 4) for v in imp.mean(0).tolist()], flush=True)
    model = train_gate(model, aug, imp, GateConfig(kind="resnet8", objective="regression", epochs=15,
                                                   hyper=hyper), out)
    serve_at_target(model, train)
    record_stage(model, "S4 round 1 (augmented-view labels)", src)
    model.save(gated)
figures = evaluate_to(GatedModel.load(gated), val, out / "eval-gated.json")
print({k: figures[k] for k in ("top1", "top1_full", "flops_ratio", "distinct_paths", "units_executed_mean")})
