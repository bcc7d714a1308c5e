#!/bin/bash
# The static path of runs/static-9 on the SWA backbone (runs/default-swa-s5/s1, 0.913): one fixed path of 9 units, the same S5 as round 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/skipserve
R=runs/static-9-swa
D=../shared/data/cifar10-train-jpeg.tar.gz
[ -f $R/start.safetensors ] || .venv/bin/python runs/static-9/make_start.py runs/default-swa-s5/round1/gated.safetensors $R/start.safetensors
# BN statistics for the fixed path on images augmented as S1 trained (Cutout 16), as the pipeline does for round 1's S4 output
[ -f $R/gated.safetensors ] || $S finetune --checkpoint $R/start.safetensors --epochs 0 --data $D --set cutout=16 --out $R/gated.safetensors --run-dir $R/recal
if [ ! -f $R/eval-gated.json ]; then
  $S eval --checkpoint $R/gated.safetensors --data $D --split val --json > $R/eval-gated.json.tmp
  mv $R/eval-gated.json.tmp $R/eval-gated.json
fi
# default-190 round 1's S5 with the knob fixed instead of flops_target
[ -f $R/model.safetensors ] || $S finetune --checkpoint $R/gated.safetensors --data $D \
    --teacher runs/default-swa-s5/s1/backbone.safetensors --epochs 24 --set lr=0.02 --set distill=0.7 \
    --out $R/model.safetensors --run-dir $R/s5
if [ ! -f $R/eval.json ]; then
  $S eval --checkpoint $R/model.safetensors --data $D --split val --json > $R/eval.json.tmp
  mv $R/eval.json.tmp $R/eval.json
fi
echo done
