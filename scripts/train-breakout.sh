#!/usr/bin/env bash
# Trains the Breakout world models of every recipe (python/crcm/training/recipes/breakout/) on a
# CPU: the data, the shared stages, then two chains side by side with one thread each (two
# one-thread processes get more out of 2 cores than one two-thread process on this model size).
#
#   bash scripts/train-breakout.sh [WORKDIR]      # default: ./breakout-work
#
# Every stage resumes from its last checkpoint: run the script again after an interruption.
# Logs: WORKDIR/logs/<chain>.log; runs: WORKDIR/runs/breakout/...
set -euo pipefail
work="${1:-breakout-work}"
mkdir -p "$work/logs"
cd "$work"
train() {
  echo "$(date -u +%FT%TZ) start $2"
  crcm train "$1" --config "breakout/$2" --quiet
  echo "$(date -u +%FT%TZ) done $2"
}

crcm collect --game breakout --episodes 150 --eval-episodes 16 --out data/breakout --quiet
train base 0-base

tf_teacher_ready() {
  while [ ! -f runs/breakout/teacher-tf/pipeline/model.safetensors ]; do sleep 10; done
}
chain_a() {  # Causal-rCM, then joint rCM (both from the TF teacher)
  train teacher-tf 1-teacher-tf
  train tf-scm causal-rcm/2-tf-scm
  train sf-dmd causal-rcm/3-sf-dmd
  train joint-rcm joint-rcm/2-joint-rcm
}
chain_b() {  # Self-Forcing (from the DF teacher), then Causal Forcing (waits for the TF teacher)
  train teacher-df 1-teacher-df
  train ode-init self-forcing/2-ode-init
  train sf-dmd self-forcing/3-sf-dmd
  tf_teacher_ready
  train tf-dcm causal-forcing/2-tf-dcm
  train sf-dmd causal-forcing/3-sf-dmd
}
export OMP_NUM_THREADS=1
( time chain_a ) > logs/chain-a.log 2>&1 &
a=$!
( time chain_b ) > logs/chain-b.log 2>&1 &
b=$!
wait $a $b
