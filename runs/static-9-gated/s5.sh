#!/bin/bash
# S5 of the per-image gate on the static path's model: 10 weight-averaged epochs at a constant lr of 0.01,
# distilled from the S1 backbone (the shipped default's last step), then BN on the gate's paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/skipserve
R=runs/static-9-gated
D=../shared/data/cifar10-train-jpeg.tar.gz
T=${FLOPS_TARGET:-0.595}
[ -f $R/model-$T.safetensors ] || $S finetune --checkpoint $R/gated-$T.safetensors --data $D \
    --teacher runs/default-190/s1/backbone.safetensors --epochs 10 --set lr=0.01 \
    --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/model-$T.safetensors --run-dir $R/s5-$T
if [ ! -f $R/eval-$T.json ]; then
  $S eval --checkpoint $R/model-$T.safetensors --data $D --split val --json > $R/eval-$T.json.tmp
  mv $R/eval-$T.json.tmp $R/eval-$T.json
fi
echo done
