#!/bin/bash
# A per-image gate around runs/static-9-swa's fixed path (make.py): the hybrid as built, after BN
# recalibration on its three paths, and after a short S5 from the static model's weights (the static
# path already had its 24 epochs; these 8 at a quarter of its rate let the weights fit the new paths).
source "$(dirname "$0")/../lib.sh"
R=runs/hybrid
STATIC=runs/static-9-swa/model.safetensors
TEACHER=runs/default-swa-s5/s1/backbone.safetensors
[ -f $R/start.safetensors ] || .venv/bin/python $R/make.py $STATIC runs/aug-labels/ordered-s5e24.safetensors $R/start.safetensors
eval_once $R/start.safetensors $R/eval-start.json
[ -f $R/gated.safetensors ] || $S finetune --checkpoint $R/start.safetensors --epochs 0 --data $D --set cutout=16 \
    --out $R/gated.safetensors --run-dir $R/recal
eval_once $R/gated.safetensors $R/eval-gated.json
[ -f $R/model.safetensors ] || $S finetune --checkpoint $R/gated.safetensors --data $D \
    --teacher $TEACHER --epochs 8 --set lr=0.005 --set distill=0.7 --out $R/model.safetensors --run-dir $R/s5
eval_once $R/model.safetensors $R/eval.json
echo done
