"""Pre-S5 top-1 of an ordered gate with its per-image term scaled by beta (0: one fixed path).

usage: python runs/aug-labels/beta.py ORDERED_GATED_CKPT OUT_DIR BETA...
"""
import copy
import sys
from pathlib import Path

from common import evaluate_to, serve_at_target, split
from gating.model import GatedModel

src, out = sys.argv[1], Path(sys.argv[2])
train, val = split()
base = GatedModel.load(src)
print("priority", [round(v, 3) for v in base.gate.priority.tolist()], flush=True)
for beta in map(float, sys.argv[3:]):
    model = copy.deepcopy(base)
    model.gate.scale_image_term(beta)  # what GateConfig.image_scale does at the end of S4
    serve_at_target(model, train).save(out / f"gated-beta{beta}.safetensors")
    f = evaluate_to(model, val, out / f"eval-gated-beta{beta}.json")
    print(beta, {k: f[k] for k in ("top1", "flops_ratio", "distinct_paths", "units_executed_mean")},
          [round(v, 2) for v in f["per_unit_skip_rate"]], flush=True)
