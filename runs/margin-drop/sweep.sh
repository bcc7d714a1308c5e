#!/bin/bash
# The drop-only start at several easy shares, before any S5 (run after run.sh's gate): margin-gate --easy E,
# BN re-estimated on the two paths without Cutout (the fixed path's weights come from S5, which trains
# without it), evaluated once. CUT=16 gives the statistics runs/hybrid used (figures in docs/training-log.md).
source "$(dirname "$0")/../lib.sh"
R=runs/margin-drop; CUT=${CUT:-0}; O=$R/sweep$([ "$CUT" = 0 ] || echo "-cutout$CUT"); mkdir -p $O
for E in ${SHARES:-0.1 0.3 0.5}; do
  [ -f $O/start-$E.safetensors ] || $S margin-gate --checkpoint $R/fixed/model.safetensors --gate-from $R/gate-raw.safetensors \
    --labels $R/labels.safetensors --data $D --easy $E --out $O/start-$E.safetensors
  [ -f $O/gated-$E.safetensors ] || $S finetune --checkpoint $O/start-$E.safetensors --epochs 0 --data $D --set cutout=$CUT \
    --out $O/gated-$E.safetensors --run-dir $O/recal-$E
  eval_once $O/gated-$E.safetensors $O/eval-gated-$E.json
done
