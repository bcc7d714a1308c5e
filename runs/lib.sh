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
