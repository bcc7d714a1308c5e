#!/bin/bash
# A per-image gate on the static path's model (runs/static-9): labels on its path, a new gate that may
# skip any unit per image, α for FLOPS_TARGET, BN re-estimated on its paths (S4; s5.sh is S5).
source "$(dirname "$0")/../lib.sh"
R=runs/static-9-gated
T=${FLOPS_TARGET:-0.575}
[ -f $R/labels.safetensors ] || $S label --checkpoint runs/static-9/model.safetensors --on-paths --data $D \
    --out $R/labels.safetensors
[ -f $R/gate-raw.safetensors ] || $S train-gate --checkpoint runs/static-9/model.safetensors \
    --labels $R/labels.safetensors --data $D --config runs/default-190/round3/gate-config.json \
    --out $R/gate-raw.safetensors --run-dir $R/gate
[ -f $R/gated-$T.safetensors ] || $S finetune --checkpoint $R/gate-raw.safetensors --epochs 0 --data $D \
    --set policy=threshold --set flops_target=$T --out $R/gated-$T.safetensors --run-dir $R/recal-$T
eval_once $R/gated-$T.safetensors $R/eval-gated-$T.json
echo done
