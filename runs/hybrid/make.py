"""A per-image gate around the best static path: runs/static-9-swa's 9 units (SWA backbone after S5,
0.9078 at 0.600 of the FLOPs), with a gate trained on labels of that path deciding, per image, one
unit fewer and one unit more.

The labels (`skipserve label --on-paths` on the static model) give imp(x, i) on the fixed path: for a
kept unit, what removing it costs; for a skipped one, what adding it gains. DROP is the kept unit
with the least mean importance on the training images, ADD the skipped unit with the most. The gate
(`skipserve train-gate` on those labels) predicts both per image: the EASY share of seeded training
images with the lowest predicted imp(x, DROP) skip DROP, and the share with the highest predicted
imp(x, ADD) run ADD, sized so the mean FLOPs (gate counted) land at TARGET. Every other unit is fixed
as on the static path (its score shifted by +-OFFSET), so there are at most four paths.

usage: make.py STATIC_MODEL GATE_MODEL LABELS OUT [EASY [TARGET]]
"""
import sys

import torch

from gating.model import GatedModel
from gating.policies import make_policy
from training.backbone import BackboneConfig, load_split
from training.data import card_split, normalize
from training.labels import load_labels
from training.run import record_stage

static_path, gate_path, labels_path, out = sys.argv[1:5]
# The units outside DROP and ADD keep their predicted importance, shifted by +-OFFSET: far from 0, so
# threshold never moves them, while budget, greedy and softmax still rank them per image.
OFFSET = 10.0
easy = float(sys.argv[5]) if len(sys.argv) > 5 else 0.3
target = float(sys.argv[6]) if len(sys.argv) > 6 else 0.597

static, trained = GatedModel.load(static_path), GatedModel.load(gate_path)
keep = static.decide(torch.zeros(1, *static.backbone.input_size))[0]  # (n,) the static path
n = static.num_units
fraction, split_seed = card_split(static.card)
train, _ = load_split(BackboneConfig(data="../shared/data/cifar10-train-jpeg.tar.gz", val_fraction=fraction,
                                     split_seed=split_seed))
imp = load_labels(labels_path, num_images=len(train), num_units=n).double().mean(0)  # (n,)
units = torch.arange(n)
drop = units[keep][imp[keep].argmin()].item()
add = units[~keep][imp[~keep].argmax()].item()

gate = trained.gate
gate.eval()
data = train.sample(10000, seed=0)
x = normalize(data.images, static.card.mean, static.card.std)
with torch.no_grad():
    s = torch.cat([gate(b) for b in x.split(500)]).double()  # (N, n) predicted importance
saving = static.flops.saving().tolist()  # (n,) FLOPs a skip saves
static_ratio = (static.flops.executed(keep[None])[0] + static.gate_flops) / static.flops.full
hard = (easy * saving[drop] + (target - static_ratio.item()) * static.flops.full) / saving[add]
assert 0 < hard < 1, f"easy share {easy} and target {target} leave a hard share of {hard:.3f}"
lo, hi = torch.quantile(s[:, drop], easy).item(), torch.quantile(s[:, add], 1 - hard).item()
with torch.no_grad():  # threshold at alpha 0 keeps unit i when its score >= 0
    shift = torch.where(keep, OFFSET, -OFFSET).to(gate.fc.bias.dtype)
    shift[drop], shift[add] = -lo, -hi
    gate.fc.bias.add_(shift)
    fixed = torch.cat([gate(b) for b in x.split(500)])[:, units[(units != drop) & (units != add)]]
assert ((fixed >= 0) == keep[(units != drop) & (units != add)]).all(), "a fixed unit's score crossed 0"
model = GatedModel(static.backbone, gate, make_policy("threshold", 0.0), static.card)
record_stage(model, "hybrid gate", static_path, gate_from=gate_path, labels=labels_path, drop_unit=drop,
             add_unit=add, easy_share=easy, hard_share=round(hard, 4), flops_target=target)
model.save(out)
print(f"{out}: mean imp {[round(v, 4) for v in imp.tolist()]}; drop unit {drop} for the easiest {easy:.3f}, "
      f"add unit {add} for the hardest {hard:.3f} (static path at {static_ratio.item():.4f} of the FLOPs)")
