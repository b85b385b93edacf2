#!/usr/bin/env bash
# Evaluates the Breakout models trained by scripts/train-breakout.sh against the emulator, on the
# same held-out episodes, and writes the table and plot.
#
#   bash scripts/eval-breakout.sh [WORKDIR] [OUTDIR]   # defaults: ./breakout-work, benches/results/breakout-eval
#
# Every model gets its own report (beside the copy-last-frame baseline); two evaluations run at a
# time with one thread each. A report that exists is kept: delete it to measure again.
set -euo pipefail
work="${1:-breakout-work}"
out="${2:-benches/results/breakout-eval}"
mkdir -p "$out"
runs="$work/runs/breakout"
jobs=()
add() {  # add REPORT_NAME LABEL PIPELINE [crcm eval options...]
  local name="$1" label="$2" model="$3"
  shift 3
  [ -f "$out/$name.json" ] && return
  jobs+=("crcm eval --quiet --episodes 8 --starts 2 --model $model --name '$label' --out $out/$name.json $*")
}
add teacher-tf "teacher TF (Euler 16 + CFG 3)" "$runs/teacher-tf/pipeline" --sampler teacher --steps 16
for steps in 1 2 4; do
  add "causal-rcm-$steps" "Causal-rCM, $steps step" "$runs/causal-rcm/sf-dmd/pipeline" --steps "$steps"
  add "self-forcing-$steps" "Self-Forcing, $steps step" "$runs/self-forcing/sf-dmd/pipeline" --steps "$steps"
  add "causal-forcing-$steps" "Causal Forcing, $steps step" "$runs/causal-forcing/sf-dmd/pipeline" --steps "$steps"
  add "joint-rcm-$steps" "joint rCM, $steps step" "$runs/joint-rcm/pipeline" --steps "$steps"
  add "tf-scm-$steps" "TF-sCM only, $steps step" "$runs/causal-rcm/tf-scm/pipeline" --steps "$steps"
done
export OMP_NUM_THREADS=1
if [ "${#jobs[@]}" -gt 0 ]; then
  printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c '{}'
fi
crcm eval-table "$out"/teacher-tf.json "$out"/causal-rcm-*.json "$out"/self-forcing-*.json \
  "$out"/causal-forcing-*.json "$out"/joint-rcm-*.json "$out"/tf-scm-*.json \
  --markdown docs/breakout-eval.md --plot docs/breakout-eval.svg
