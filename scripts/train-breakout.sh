#!/usr/bin/env bash
# Trains the shipped Breakout world model (python/crcm/training/recipes/breakout/) on a CPU:
# the data (two datasets), the 5-part TF teacher, then TF-sCM beside the bidirectional base
# model (the DMD real score), then the student's pixel head (the shipped model), then SF-DMD. With --all it also trains the baselines of the
# recipe comparison (Self-Forcing, Causal Forcing, joint rCM), two chains side by side.
#
#   bash scripts/train-breakout.sh [WORKDIR] [--all]     # default WORKDIR: ./breakout-work
#
# Every stage resumes from its last checkpoint: run the script again after an interruption.
# Logs: WORKDIR/logs/*.log; runs: WORKDIR/runs/breakout/...
set -euo pipefail
work="${1:-breakout-work}"
all="${2:-}"
mkdir -p "$work/logs"
cd "$work"
train() {  # train STAGE RECIPE THREADS
  echo "$(date -u +%FT%TZ) start $2"
  OMP_NUM_THREADS="$3" crcm train "$1" --config "breakout/$2" --quiet
  echo "$(date -u +%FT%TZ) done $2"
}

crcm collect --game breakout --episodes 150 --eval-episodes 16 --out data/breakout --quiet
# The teacher's last part and every later stage: keys held as a person holds them.
crcm collect --game breakout --episodes 150 --eval-episodes 4 \
  --policies tracker:0.5,random:0.2,keys:0.3 --out data/breakout-keys --quiet
# The teacher is the long pole: both cores. Then two one-thread processes side by side (on 2
# cores they get more done than one two-thread process at this model size).
train teacher-tf 1-teacher-tf-motion 2 >> logs/main.log 2>&1
train teacher-tf 1-teacher-tf-static 2 >> logs/main.log 2>&1
train teacher-tf 1-teacher-tf-sampling 2 >> logs/main.log 2>&1
train teacher-tf 1-teacher-tf-keys 2 >> logs/main.log 2>&1
train teacher-tf 1-teacher-tf 2 >> logs/main.log 2>&1
train tf-scm causal-rcm/2-tf-scm 1 >> logs/main.log 2>&1 &
a=$!
train base 0-base 1 >> logs/base.log 2>&1 &
b=$!
wait $a $b
train teacher-tf causal-rcm/3-pixel-head-tf 2 >> logs/main.log 2>&1
train teacher-tf causal-rcm/3-pixel-head 2 >> logs/main.log 2>&1
train sf-dmd causal-rcm/3-sf-dmd 2 >> logs/main.log 2>&1

if [ "$all" = "--all" ]; then
  chain_a() {  # Self-Forcing: DF teacher → ODE init → SF-DMD (random exit steps)
    train teacher-df 1-teacher-df 1
    train ode-init self-forcing/2-ode-init 1
    train sf-dmd self-forcing/3-sf-dmd 1
  }
  chain_b() {  # Causal Forcing (TF-dCM → SF-DMD), then joint rCM
    train tf-dcm causal-forcing/2-tf-dcm 1
    train sf-dmd causal-forcing/3-sf-dmd 1
    train joint-rcm joint-rcm/2-joint-rcm 1
  }
  chain_a >> logs/chain-a.log 2>&1 &
  a=$!
  chain_b >> logs/chain-b.log 2>&1 &
  b=$!
  wait $a $b
fi
