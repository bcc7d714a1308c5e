#!/bin/bash
# Static baseline of round 1: one fixed path of 9 units for every image, the same S5 as round 1.
# SRC (a round-1 gated checkpoint), TEACHER (its S1 backbone) and R (the output folder) default to
# runs/default-190's; runs/static-9-swa/run.sh sets them for the SWA backbone.
source "$(dirname "$0")/../lib.sh"
SRC=${SRC:-runs/default-190/round1/gated.safetensors}
TEACHER=${TEACHER:-runs/default-190/s1/backbone.safetensors}
R=${R:-runs/static-9}
# which units round 1's gate skips on the training images (make_start.py skips the six it skips most)
eval_once runs/default-190/round1/gated.safetensors runs/static-9/round1-gate-train-split.json --split train
[ -f $R/start.safetensors ] || .venv/bin/python runs/static-9/make_start.py $SRC $R/start.safetensors
# BN statistics for the fixed path on images augmented as S1 trained, as the pipeline does for round 1's S4 output,
# then round 1's S5 (runs/default-190/round1/finetune-config.json) with the knob fixed instead of flops_target
gate_s5 $R 24 0.02 $TEACHER
echo done
