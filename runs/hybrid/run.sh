#!/bin/bash
# A per-image gate around runs/static-9-swa's fixed path (`skipserve margin-gate`): labels on that path (S3 on its
# own paths), a ResNet-8 gate trained on them (S4, the shipped gate's config), one unit dropped for
# easy images and one added for hard ones; BN re-estimated on the new paths, then a short S5 from the
# static model's weights (the static path already had its 24 epochs; these 8 at a quarter of its rate
# let the weights fit the new paths).
source "$(dirname "$0")/../lib.sh"
# R (the output folder), STATIC (a fixed-path model) and TEACHER (its S1 backbone) default to the SWA
# backbone's; runs/hybrid-190/run.sh sets them for the 190-epoch backbone the shipped default started from.
R=${R:-runs/hybrid}
STATIC=${STATIC:-runs/static-9-swa/model.safetensors}
TEACHER=${TEACHER:-runs/default-swa-s5/s1/backbone.safetensors}
mkdir -p $R
[ -f $R/labels.safetensors ] || $S label --checkpoint $STATIC --on-paths --data $D --out $R/labels.safetensors
[ -f $R/gate-raw.safetensors ] || $S train-gate --checkpoint $STATIC --labels $R/labels.safetensors --data $D \
    --config runs/default-190/round3/gate-config.json --out $R/gate-raw.safetensors --run-dir $R/gate
[ -f $R/start.safetensors ] || $S margin-gate --checkpoint $STATIC --gate-from $R/gate-raw.safetensors \
    --labels $R/labels.safetensors --data $D --easy ${EASY:-0.3} --flops-target ${TARGET:-0.597} --out $R/start.safetensors
gate_s5 $R 8 0.005 $TEACHER
# then the shipped default's last step: 8 epochs at a constant lr 0.005, the weights averaged (SWA), BN on the average
[ -f $R/swa.safetensors ] || $S finetune --checkpoint $R/model.safetensors --data $D --teacher $TEACHER --epochs 8 \
    --set lr=0.005 --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/swa.safetensors --run-dir $R/swa
eval_once $R/swa.safetensors $R/eval-swa.json
echo done
