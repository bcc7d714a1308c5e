#!/bin/bash
# S3 labels on two crop+flip views of every training image (runs/aug-labels/exp.py), on the 0.913
# SWA backbone; an unconstrained ResNet-8 gate and an ordered one (one priority per unit plus one
# scalar per image: nested paths) trained on them; then the same short S5 (6 epochs, cosine from
# lr 0.02, distilled from the SWA backbone) for the unconstrained gate (142 paths) and the ordered
# gate with its per-image term at 0.25 (11 paths), to see whether the number of paths is what S5 pays for.
source "$(dirname "$0")/../lib.sh"
B=runs/default-swa-s5/s1/backbone.safetensors
A=runs/aug-labels
[ -f $A/swa-v2/eval-gated.json ] || .venv/bin/python $A/exp.py $B $A/swa-v2 2
[ -f $A/swa-ordered/eval-gated.json ] || .venv/bin/python $A/exp.py $B $A/swa-ordered 2 \
    '{"resolution": 16, "ordered": true}' $A/swa-v2/labels.safetensors
[ -f $A/swa-ordered/eval-gated-beta0.25.json ] || .venv/bin/python $A/beta.py $A/swa-ordered/gated.safetensors $A/swa-ordered 0 0.25 0.5
for m in swa-ordered/gated-beta0.25 swa-v2/gated; do
  [ -f $A/$m-s5e6.json ] || [ -f $A/$m-s5e6.safetensors ] || $S finetune --checkpoint $A/$m.safetensors --data $D --teacher $B --epochs 6 \
      --set lr=0.02 --set distill=0.7 --out $A/$m-s5e6.safetensors --run-dir $A/$m-s5e6
  eval_once $A/$m-s5e6.safetensors $A/$m-s5e6.json
done
# round 1's full S5 (24 epochs) on the nested paths: 0.8982 (docs/training-log.md), against 0.8900 (round 1
# on this backbone, 227 paths) and 0.9078 (one fixed path). Resumes from ordered-s5e24/finetune-state.pt.
[ -f $A/ordered-s5e24.safetensors ] || $S finetune --checkpoint $A/swa-ordered/gated-beta0.25.safetensors --data $D \
    --teacher $B --epochs 24 --set lr=0.02 --set distill=0.7 --out $A/ordered-s5e24.safetensors --run-dir $A/ordered-s5e24
eval_once $A/ordered-s5e24.safetensors $A/ordered-s5e24.json
echo done
