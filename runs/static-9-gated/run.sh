#!/bin/bash
# A per-image gate on the static path's model (runs/static-9): labels on its path, a new gate that may
# skip any unit per image, α for FLOPS_TARGET, BN re-estimated on its paths (S4 only; S5 is a later step).
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/skipserve
R=runs/static-9-gated
D=../shared/data/cifar10-train-jpeg.tar.gz
T=${FLOPS_TARGET:-0.575}
[ -f $R/labels.safetensors ] || $S label --checkpoint runs/static-9/model.safetensors --on-paths --data $D --out $R/labels.safetensors
[ -f $R/gate-raw.safetensors ] || $S train-gate --checkpoint runs/static-9/model.safetensors --labels $R/labels.safetensors --data $D \
    --config runs/default-190/round3/gate-config.json --out $R/gate-raw.safetensors --run-dir $R/gate
[ -f $R/gated-$T.safetensors ] || $S finetune --checkpoint $R/gate-raw.safetensors --epochs 0 --data $D \
    --set policy=threshold --set flops_target=$T --out $R/gated-$T.safetensors --run-dir $R/recal-$T
if [ ! -f $R/eval-gated-$T.json ]; then
  $S eval --checkpoint $R/gated-$T.safetensors --data $D --split val --json > $R/eval-gated-$T.json.tmp
  mv $R/eval-gated-$T.json.tmp $R/eval-gated-$T.json
fi
echo done
