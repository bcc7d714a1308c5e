#!/bin/bash
# S5 of the per-image gate on the static path's model: 10 weight-averaged epochs at a constant lr of 0.01,
# distilled from the S1 backbone (the shipped default's last step), then BN on the gate's paths.
source "$(dirname "$0")/../lib.sh"
R=runs/static-9-gated
T=${FLOPS_TARGET:-0.595}
[ -f $R/model-$T.safetensors ] || $S finetune --checkpoint $R/gated-$T.safetensors --data $D \
    --teacher runs/default-190/s1/backbone.safetensors --epochs 10 --set lr=0.01 \
    --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/model-$T.safetensors --run-dir $R/s5-$T
eval_once $R/model-$T.safetensors $R/eval-$T.json
echo done
