"""The static baseline of round 1: the same S1 backbone with one fixed 9-of-15-unit path for every image.

The gate of runs/default-190/round1/gated.safetensors is kept (so its FLOPs are counted, as for the
gated model) but made constant: fc weight 0, bias +1 for a kept unit and -1 for a skipped one, so
`threshold` at round 1's alpha (-0.0738) keeps the same units for every image. The skipped units
are the six round 1's gate skipped most often on the training split (round1-gate-train-split.json,
from run.sh: 0.93, 0.95, 0.92, 0.78, 0.66, 0.53 for units 6, 7, 8, 9, 1, 2, the next 0.32; the
same six on the validation split, and the shipped default skips the same six most).
"""
import sys

import torch

from gating.model import GatedModel
from training.run import record_stage

SKIP = (1, 2, 6, 7, 8, 9)

src, out = sys.argv[1], sys.argv[2]
model = GatedModel.load(src)
with torch.no_grad():
    model.gate.fc.weight.zero_()
    model.gate.fc.bias.copy_(torch.tensor([-1.0 if i in SKIP else 1.0 for i in range(model.num_units)]))
record_stage(model, "static path", src, skipped_units=list(SKIP))
model.save(out)
print(f"{out}: skips units {SKIP} for every image, policy {model.policy.to_dict()}")
