"""runs/hybrid's four-path gate on the SWA backbone's weights (runs/static-9-swa/start.safetensors, before
any S5), so that S5 trains the network for those paths from the start, as round 1 trains a gated model
and runs/static-9-swa trained its one path.

usage: make_start.py HYBRID_START STATIC_START OUT
"""
import sys

from gating.model import GatedModel
from training.run import record_stage

hybrid_path, static_path, out = sys.argv[1:4]
hybrid, static = GatedModel.load(hybrid_path), GatedModel.load(static_path)
model = GatedModel(static.backbone, hybrid.gate, hybrid.policy, static.card)
record_stage(model, "hybrid gate on S1 weights", static_path, gate_from=hybrid_path)
model.save(out)
print(f"{out}: the gate of {hybrid_path} on the backbone of {static_path}")
