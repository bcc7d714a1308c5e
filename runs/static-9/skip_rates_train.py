# Round 1's gate (runs/default-190) on the training split: how often each unit is skipped under its threshold rule.
import json, sys, torch
from gating.model import GatedModel
from training.backbone import BackboneConfig, load_split
from training.data import card_split, normalize
torch.set_num_threads(1)
m = GatedModel.load(sys.argv[1]).eval()
fraction, seed = card_split(m.card)
train, _ = load_split(BackboneConfig(data="../shared/data/cifar10-train-jpeg.tar.gz", val_fraction=fraction, split_seed=seed))
skips, n = torch.zeros(m.num_units), 0
with torch.inference_mode():
    for i in range(0, len(train), 1000):
        x = normalize(train.images[i:i + 1000], m.card.mean, m.card.std)
        keep = m.decide(x)
        skips += (~keep.bool()).float().sum(0); n += len(x)
r = (skips / n).tolist()
print(json.dumps({"checkpoint": sys.argv[1], "split": "train", "n_images": n, "per_unit_skip_rate": [round(v, 4) for v in r],
                  "six_most_skipped": sorted(range(len(r)), key=lambda i: -r[i])[:6]}))
