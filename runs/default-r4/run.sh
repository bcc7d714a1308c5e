#!/bin/bash
# Round 4 on the shipped default: labels on its own paths, a new gate, α for 0.595, SWA S5.
source "$(dirname "$0")/../lib.sh"
R=runs/default-r4
[ -f $R/labels.safetensors ] || $S label --checkpoint default --on-paths --data $D --out $R/labels.safetensors
[ -f $R/gate-raw.safetensors ] || $S train-gate --checkpoint default --labels $R/labels.safetensors --data $D \
    --config runs/default-190/round3/gate-config.json --out $R/gate-raw.safetensors --run-dir $R/gate
[ -f $R/gated.safetensors ] || $S finetune --checkpoint $R/gate-raw.safetensors --epochs 0 --data $D \
    --set policy=threshold --set flops_target=0.595 --out $R/gated.safetensors --run-dir $R/recal
eval_once $R/gated.safetensors $R/eval-gated.json
[ -f $R/model.safetensors ] || $S finetune --checkpoint $R/gated.safetensors --data $D \
    --teacher runs/default-190/s1/backbone.safetensors --epochs 12 --set lr=0.01 \
    --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/model.safetensors --run-dir $R/swa
eval_once $R/model.safetensors $R/eval.json
echo done
