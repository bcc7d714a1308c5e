#!/bin/bash
# runs/hybrid's four paths (unit 13 skipped for easy images, unit 7 run for hard ones) trained by a full
# S5 from the SWA backbone's weights, as runs/static-9-swa trained its one path (make_start.py), instead
# of 8 short epochs from the fixed path's weights.
source "$(dirname "$0")/../lib.sh"
R=runs/hybrid-s5
TEACHER=runs/default-swa-s5/s1/backbone.safetensors
[ -f $R/start.safetensors ] || .venv/bin/python $R/make_start.py runs/hybrid/start.safetensors \
    runs/static-9-swa/start.safetensors $R/start.safetensors
[ -f $R/gated.safetensors ] || $S finetune --checkpoint $R/start.safetensors --epochs 0 --data $D --set cutout=16 \
    --out $R/gated.safetensors --run-dir $R/recal
eval_once $R/gated.safetensors $R/eval-gated.json
[ -f $R/model.safetensors ] || $S finetune --checkpoint $R/gated.safetensors --data $D \
    --teacher $TEACHER --epochs 20 --set lr=0.02 --set distill=0.7 --out $R/model.safetensors --run-dir $R/s5
eval_once $R/model.safetensors $R/eval.json
echo done
