#!/bin/bash
# default-static: the static depth cut of default-backbone at no fewer FLOPs than `default` (10 of 15
# units, no gate), trained as `default` was after its cut: S5 24 epochs (lr 0.02, cosine), 8 (lr 0.005),
# 8 weight-averaged (lr 0.005, constant), each distilled from default-backbone (0.7, T 4). Resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/skipserve
D=../shared/data/cifar10-train-jpeg.tar.gz
R=runs/default-static
T=default-backbone
# cut.safetensors (committed) is the recipe's static-cut stage: default-backbone without units 1, 6, 7, 8, 9
[ -f $R/s5a.safetensors ] || $S finetune --checkpoint $R/cut.safetensors --data $D --teacher $T --epochs 24 \
    --set lr=0.02 --set distill=0.7 --out $R/s5a.safetensors --run-dir $R/s5a
[ -f $R/s5b.safetensors ] || $S finetune --checkpoint $R/s5a.safetensors --data $D --teacher $T --epochs 8 \
    --set lr=0.005 --set distill=0.7 --out $R/s5b.safetensors --run-dir $R/s5b
[ -f $R/model.safetensors ] || $S finetune --checkpoint $R/s5b.safetensors --data $D --teacher $T --epochs 8 \
    --set lr=0.005 --set schedule=constant --set average_from=0 --set distill=0.7 --out $R/model.safetensors --run-dir $R/swa
[ -f $R/eval.json ] || { $S eval --checkpoint $R/model.safetensors --data $D --split val --json > $R/eval.json.tmp && mv $R/eval.json.tmp $R/eval.json; }
echo done
