#!/bin/bash
# A second, longer weight-averaged S5 from the shipped default (its own gate and knob), 20 epochs.
source "$(dirname "$0")/../lib.sh"
R=runs/default-swa20
[ -f $R/model.safetensors ] || $S finetune --checkpoint default --data $D \
    --teacher runs/default-190/s1/backbone.safetensors --epochs 20 --set lr=0.01 \
    --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/model.safetensors --run-dir $R/swa
eval_once $R/model.safetensors $R/eval.json
echo done
