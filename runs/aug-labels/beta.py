"""Pre-S5 top-1 of an ordered gate with its per-image term scaled by beta (0: one fixed path)."""
import copy
import json
import sys
from pathlib import Path

import torch

from gating.checkpoint import atomic_write_text
from gating.model import GatedModel
from training.backbone import BackboneConfig, load_split
from training.evaluate import evaluate_gated
from training.finetune import FinetuneConfig, recalibrate_bn, served_policy

src, out = sys.argv[1], Path(sys.argv[2])
train, val = load_split(BackboneConfig(data="../shared/data/cifar10-train-jpeg.tar.gz", val_fraction=0.1, split_seed=0))
base = GatedModel.load(src)
print("priority", [round(v, 3) for v in base.gate.priority.tolist()], flush=True)
for beta in map(float, sys.argv[3:]):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.gate.fc.weight.mul_(beta)
        model.gate.fc.bias.mul_(beta)
    ft = FinetuneConfig(policy="threshold", flops_target=0.595)
    model.policy = served_policy(model, train, ft)
    recalibrate_bn(model, train, images=ft.recalibration_images, seed=ft.seed, cutout_size=16)
    model.save(out / f"gated-beta{beta}.safetensors")
    f = evaluate_gated(model, val)
    atomic_write_text(out / f"eval-gated-beta{beta}.json", json.dumps(f, indent=2) + "\n")
    print(beta, {k: f[k] for k in ("top1", "flops_ratio", "distinct_paths", "units_executed_mean")},
          [round(v, 2) for v in f["per_unit_skip_rate"]], flush=True)
