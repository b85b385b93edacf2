#!/usr/bin/env bash
# Trains the Breakout world models of every recipe on one GPU in a fixed wall-clock budget: the
# same stages and recipes as scripts/train-breakout.sh, with a batch of 32 and each stage boxed
# in time instead of steps (the number of steps it reached is in its metrics.jsonl).
#
#   bash scripts/train-breakout-gpu.sh [WORKDIR] [SCALE]   # default: ./breakout-work, 1
#
# SCALE multiplies every stage's time box (1 ≈ 6 minutes end to end on one H200). The models are
# small enough that one process leaves the GPU mostly idle (kernel launches bound the step), so
# the three chains after the shared stages run side by side. A stage that reaches its time box
# is stopped and its pipeline exported from its last checkpoint; the next stage starts from it.
set -euo pipefail
work="${1:-breakout-work}"
scale="${2:-1}"
recipes="$(python3 -c 'import crcm.training.config as c; print(c.RECIPES)')/breakout"
mkdir -p "$work/logs"
cd "$work"

train() {  # train STAGE RECIPE SECONDS [KEY=VALUE...]
  local stage="$1" recipe="$2" secs out last
  secs="$(python3 -c "print(round($3 * $scale))")"
  shift 3
  out="$(sed -n 's/^out = "\(.*\)"/\1/p' "$recipes/$recipe.toml")"
  echo "$(date -u +%FT%TZ) start $recipe (at most ${secs}s)"
  timeout --signal=INT --kill-after=30 "$secs" \
    crcm train "$stage" --config "breakout/$recipe" --quiet checkpoint_every=50 "$@" || true
  if [ ! -f "$out/pipeline/model.safetensors" ]; then
    last="$(cat "$out/checkpoints/latest")"  # the newest complete checkpoint, step-NNNNNNNN
    last="$((10#${last#step-}))"
    echo "time box reached at step $last: exporting that checkpoint"
    crcm train "$stage" --config "breakout/$recipe" --quiet checkpoint_every=50 "$@" "steps=$last"
  fi
  echo "$(date -u +%FT%TZ) done $recipe"
}

[ -f data/breakout/manifest.json ] ||
  crcm collect --game breakout --episodes 150 --eval-episodes 16 --out data/breakout --quiet
[ -f data/breakout-keys/manifest.json ] ||
  crcm collect --game breakout --episodes 150 --eval-episodes 4 \
    --policies tracker:0.5,random:0.2,keys:0.3 --out data/breakout-keys --quiet
train base 0-base 40 batch_size=32 steps=100000

tf_teacher_ready() {
  while [ ! -f runs/breakout/teacher-tf/pipeline/model.safetensors ]; do sleep 2; done
}
chain_a() {  # Causal-rCM, then joint rCM
  # The teacher's five parts (docs/breakout-model.md), 95 s in all.
  train teacher-tf 1-teacher-tf-motion 30 batch_size=32 steps=100000
  train teacher-tf 1-teacher-tf-static 15 batch_size=32 steps=100000
  train teacher-tf 1-teacher-tf-sampling 20 batch_size=32 steps=100000
  train teacher-tf 1-teacher-tf-keys 15 batch_size=32 steps=100000
  train teacher-tf 1-teacher-tf 15 batch_size=32 steps=100000
  train tf-scm causal-rcm/2-tf-scm 60 batch_size=32 steps=100000
  train teacher-tf causal-rcm/3-pixel-head-tf 20 batch_size=32 steps=100000
  train teacher-tf causal-rcm/3-pixel-head 30 batch_size=32 steps=100000
  train sf-dmd causal-rcm/3-sf-dmd 90 batch_size=16 steps=100000
  train joint-rcm joint-rcm/2-joint-rcm 60 batch_size=16 steps=100000
}
chain_b() {  # Self-Forcing
  train teacher-df 1-teacher-df 80 batch_size=32 steps=100000
  train ode-init self-forcing/2-ode-init 60 batch_size=32 steps=100000
  train sf-dmd self-forcing/3-sf-dmd 90 batch_size=16 steps=100000
}
chain_c() {  # Causal Forcing (from the TF teacher)
  tf_teacher_ready
  train tf-dcm causal-forcing/2-tf-dcm 60 batch_size=32 steps=100000
  train sf-dmd causal-forcing/3-sf-dmd 90 batch_size=16 steps=100000
}
( time chain_a ) > logs/chain-a.log 2>&1 &
a=$!
( time chain_b ) > logs/chain-b.log 2>&1 &
b=$!
( time chain_c ) > logs/chain-c.log 2>&1 &
c=$!
wait $a $b $c
