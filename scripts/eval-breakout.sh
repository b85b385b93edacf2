#!/usr/bin/env bash
# Evaluates the Breakout models trained by scripts/train-breakout.sh against the emulator, on the
# same held-out episodes, and writes the table and plot.
#
#   bash scripts/eval-breakout.sh [WORKDIR] [OUTDIR] [DOC]
#   # defaults: ./breakout-work, benches/results/breakout-eval, docs/breakout-eval (.md and .svg)
#
# Every model gets its own report (beside the copy-last-frame baseline); two evaluations run at a
# time with one thread each. A report that exists is kept: delete it to measure again.
set -euo pipefail
work="${1:-breakout-work}"
out="${2:-benches/results/breakout-eval}"
docs="${3:-docs/breakout-eval}"
mkdir -p "$out"
runs="$work/runs/breakout"
jobs=()
add() {  # add REPORT_NAME LABEL PIPELINE [crcm eval options...]
  local name="$1" label="$2" model="$3"
  shift 3
  [ -f "$out/$name.json" ] && return
  if [ ! -f "$model/model.safetensors" ]; then echo "skipping $label: no $model" >&2; return; fi
  jobs+=("crcm eval --quiet --episodes 8 --starts 2 --model $model --name '$label' --out $out/$name.json $*")
}
# Each recipe's stages from the same TF teacher, at its pipeline's own sampler (1 step per frame
# and the still threshold it was trained with) with 1, 2 and 4 steps per frame. Causal-rCM ships
# its TF-sCM stage: SF-DMD, scored by the short base run, made it worse (docs/breakout-model.md).
for steps in 1 2 4; do
  add "causal-rcm-$steps" "Causal-rCM, $steps-step" "$runs/causal-rcm/tf-scm/pipeline" --steps "$steps"
  add "causal-rcm-sf-dmd-$steps" "Causal-rCM + SF-DMD, $steps-step" "$runs/causal-rcm/sf-dmd/pipeline" --steps "$steps"
  add "causal-forcing-tf-dcm-$steps" "Causal Forcing (TF-dCM), $steps-step" "$runs/causal-forcing/tf-dcm/pipeline" --steps "$steps"
  add "causal-forcing-$steps" "Causal Forcing (TF-dCM + SF-DMD), $steps-step" "$runs/causal-forcing/sf-dmd/pipeline" --steps "$steps"
  add "self-forcing-ode-init-$steps" "Self-Forcing (ODE init), $steps-step" "$runs/self-forcing/ode-init/pipeline" --steps "$steps"
  add "self-forcing-$steps" "Self-Forcing, $steps-step" "$runs/self-forcing/sf-dmd/pipeline" --steps "$steps"
  add "joint-rcm-$steps" "joint rCM, $steps-step" "$runs/joint-rcm/pipeline" --steps "$steps"
done
export OMP_NUM_THREADS=1
if [ "${#jobs[@]}" -gt 0 ]; then
  # -d '\n': one job per line, its quotes left for bash
  printf '%s\n' "${jobs[@]}" | xargs -d '\n' -P 2 -I{} bash -c '{}'
fi
shopt -s nullglob
crcm eval-table "$out"/causal-rcm-*.json "$out"/causal-forcing-*.json "$out"/self-forcing-*.json \
  "$out"/joint-rcm-*.json \
  --markdown "$docs.md" --plot "$docs.svg"
