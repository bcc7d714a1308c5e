#!/bin/bash
# default-56: default-backbone (CIFAR ResNet-32) grown to a ResNet-56 by identity-initialised units
# (training/grow.py), then trained 30 epochs (cosine from lr 0.05, Cutout 16). Resumable per epoch:
# rerun this script on any machine; the run directory holds the state.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=runs/default-56
.venv/bin/skipserve train-backbone --run-dir $R/grow --epochs 30 \
    --set init=gating/weights/default-backbone.safetensors --set grow=resnet56 \
    --set lr=0.05 --set cutout=16 --set compile=true
