#!/bin/bash
# runs/hybrid's four paths (unit 13 skipped for easy images, unit 7 run for hard ones) trained by a full
# S5 from the SWA backbone's weights, as runs/static-9-swa trained its one path (make_start.py), instead
# of 8 short epochs from the fixed path's weights.
source "$(dirname "$0")/../lib.sh"
R=runs/hybrid-s5
TEACHER=runs/default-swa-s5/s1/backbone.safetensors
[ -f $R/start.safetensors ] || .venv/bin/python $R/make_start.py runs/hybrid/start.safetensors \
    runs/static-9-swa/start.safetensors $R/start.safetensors
gate_s5 $R 20 0.02 $TEACHER
echo done
