#!/bin/bash
# A second, longer weight-averaged S5 from the shipped default (its own gate and knob), 20 epochs.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/skipserve
R=runs/default-swa20
D=../shared/data/cifar10-train-jpeg.tar.gz
if [ ! -f $R/model.safetensors ]; then
  $S finetune --checkpoint default --data $D --teacher runs/default-190/s1/backbone.safetensors --epochs 20 \
      --set lr=0.01 --set schedule=constant --set average_from=0 --set distill=0.7 \
      --out $R/model.safetensors --run-dir $R/swa
fi
if [ ! -f $R/eval.json ]; then
  $S eval --checkpoint $R/model.safetensors --data $D --split val --json > $R/eval.json.tmp
  mv $R/eval.json.tmp $R/eval.json
fi
echo done
