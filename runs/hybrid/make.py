"""A per-image gate around the best static path: runs/static-9-swa's 9 units (SWA backbone after S5,
0.9078 at 0.600 of the FLOPs), with the ordered gate of runs/aug-labels/ordered-s5e24 deciding, per
image, one unit more or one fewer. Its per-image term d(x) (higher: the image wants more units) is
ranked on seeded training images: the easiest EASY share of images drop unit DROP, the hardest HARD
share add unit ADD, the rest run the static path. Three nested paths, about the static path's FLOPs.

usage: make.py STATIC_MODEL ORDERED_MODEL OUT [EASY HARD]
"""
import sys

import torch

from gating.model import GatedModel
from gating.policies import make_policy
from training.backbone import BackboneConfig, load_split
from training.data import card_split, normalize
from training.run import record_stage

DROP, ADD = 12, 8  # the kept unit the static ranking keeps least often; the skipped unit it keeps most often
static_path, ordered_path, out = sys.argv[1:4]
easy, hard = (float(a) for a in sys.argv[4:6]) if len(sys.argv) > 5 else (0.22, 0.18)

static, ordered = GatedModel.load(static_path), GatedModel.load(ordered_path)
gate = ordered.gate
assert gate.ordered, f"{ordered_path}: the gate is not ordered"
keep = static.decide(torch.zeros(1, *static.backbone.input_size))[0]  # the static path (same for every image)
assert keep[DROP] and not keep[ADD], f"static path {keep.int().tolist()}: unit {DROP} must be kept, {ADD} skipped"

fraction, split_seed = card_split(static.card)
train, _ = load_split(BackboneConfig(data="../shared/data/cifar10-train-jpeg.tar.gz", val_fraction=fraction,
                                     split_seed=split_seed))
data = train.sample(10000, seed=0)
x = normalize(data.images, static.card.mean, static.card.std)
with torch.no_grad():
    gate.priority.zero_()
    gate.eval()
    d = torch.cat([gate(b)[:, 0] for b in x.split(500)]).double()  # (N,) the per-image term alone
lo, hi = torch.quantile(d, easy).item(), torch.quantile(d, 1 - hard).item()
with torch.no_grad():  # threshold at alpha 0 keeps unit i when priority_i + d(x) >= 0
    prio = torch.where(keep, 100.0, -100.0)
    prio[DROP], prio[ADD] = -lo, -hi
    gate.priority.copy_(prio)
model = GatedModel(static.backbone, gate, make_policy("threshold", 0.0), static.card)
record_stage(model, "hybrid gate", static_path, gate_from=ordered_path, drop_unit=DROP, add_unit=ADD,
             easy_share=easy, hard_share=hard)
model.save(out)
print(f"{out}: d(x) quantiles {easy}: {lo:.4f}, {1 - hard}: {hi:.4f}; priorities {prio.tolist()}")
