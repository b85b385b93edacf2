#!/usr/bin/env bash
# The GPU rows of the speed issue in one command, on a machine with one CUDA GPU, torch and
# Triton but maybe no Rust and no network: installs the carried wheels (crcm's abi3 wheel,
# diffusers and importlib_metadata for the VAE rows) into /tmp/site, then runs
# benches/bench_wan.py within a time budget (rows written as they go).
#
#   # where Rust and the network are (this checkout, ignored folder wheels/):
#   maturin build --release && mkdir -p wheels && cp target/wheels/crcm-*.whl wheels/
#   pip download diffusers importlib_metadata --no-deps -d wheels/
#   # on the GPU machine, from the checkout's root (a 600 s command limit):
#   bash scripts/gpu-wan-bench.sh [OUT_DIR] [BUDGET_S]      # defaults: benches/results, 400
#
# Rows, most important first: c3-3 4/2-step and c1-1 1-step end to end, each eager and then
# compiled (Runtime(compile=True)), 8 streams, DiT only, noisy context, ... beside the research
# loop (dense KV cache, eager, SDPA). JSON: OUT_DIR/wan-e2e-<gpu>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benches/results}"
budget="${2:-400}"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU')"
if ! python3 -c "import crcm._native" 2>/dev/null; then
  ls wheels/crcm-*.whl >/dev/null || { echo "no crcm wheel in wheels/ (see above)" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
mkdir -p "$out"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
PYTHONUNBUFFERED=1 python3 benches/bench_wan.py --budget-s "$budget" --out "$out/wan-e2e-$gpu.json"
