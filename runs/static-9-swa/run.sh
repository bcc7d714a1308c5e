#!/bin/bash
# The static path of runs/static-9 on the SWA backbone (runs/default-swa-s5/s1, 0.913), whose round-1
# gate skips the same six units most.
SRC=runs/default-swa-s5/round1/gated.safetensors TEACHER=runs/default-swa-s5/s1/backbone.safetensors \
    R=runs/static-9-swa exec "$(dirname "$0")/../static-9/run.sh"
