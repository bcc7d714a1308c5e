# Sourced by the run scripts under runs/: the repository root as working directory, the CLI, the
# training archive, and each evaluation written once and atomically (a killed script redoes it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
S=.venv/bin/skipserve
D=../shared/data/cifar10-train-jpeg.tar.gz

# eval_once CHECKPOINT OUT.json [EXTRA ARGS]: `skipserve eval` on the validation split (unless the
# extra args name another), unless OUT.json exists
eval_once() {
  local ckpt=$1 out=$2
  shift 2
  [ -f "$out" ] && return 0
  $S eval --checkpoint "$ckpt" --data $D --split val --json "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
}

# gate_s5 R EPOCHS LR TEACHER [CUTOUT]: R/start.safetensors's BN re-estimated on its gate's paths on images
# augmented as its weights were last trained (CUTOUT: 16, S1's Cutout, for S1 weights; 0 for weights S5
# trained, which S5 does without Cutout) -> R/gated.safetensors, then S5 distilled from TEACHER ->
# R/model.safetensors, each evaluated once (R/eval-gated.json, R/eval.json)
gate_s5() {
  local r=$1 epochs=$2 lr=$3 teacher=$4 cut=${5:-16}
  [ -f $r/gated.safetensors ] || $S finetune --checkpoint $r/start.safetensors --epochs 0 --data $D --set cutout=$cut \
      --out $r/gated.safetensors --run-dir $r/recal
  eval_once $r/gated.safetensors $r/eval-gated.json
  [ -f $r/model.safetensors ] || $S finetune --checkpoint $r/gated.safetensors --data $D \
      --teacher $teacher --epochs $epochs --set lr=$lr --set distill=0.7 --out $r/model.safetensors --run-dir $r/s5
  eval_once $r/model.safetensors $r/eval.json
}
