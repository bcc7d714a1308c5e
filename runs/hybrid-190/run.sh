#!/bin/bash
# runs/hybrid's margin route on the 190-epoch backbone the shipped default started from
# (runs/default-190/s1, 0.9078): its fixed 9-unit path again (runs/static-9/run.sh into
# runs/static-9-190, since runs/static-9's weights were not kept), then labels on that path, a gate
# dropping unit DROP for easy images and running unit ADD for hard ones, a short S5 and weight averaging.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/static-9-190
R=runs/static-9-190 runs/static-9/run.sh
R=runs/hybrid-190 STATIC=runs/static-9-190/model.safetensors TEACHER=runs/default-190/s1/backbone.safetensors \
    runs/hybrid/run.sh
