#!/usr/bin/env bash
# The GPU checks of the Triton kernels, on a machine with a CUDA GPU and crcm installed: the GPU
# tests, then the kernel benchmark with every launch configuration timed. The benchmark writes
# benches/results/kernels-<gpu>.json (or --out PATH).
#
#   bash scripts/gpu-kernels.sh [--full] [--out PATH]
#
# --full runs every shape of the benchmark (1, 4 and 16 streams; contexts from 0 to 20 frames;
# 9- and 21-frame JVPs) instead of the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU')"
quick=--quick
if [ "${1:-}" = --full ]; then
  quick=
  shift
fi
python -m pytest -q -p no:cacheprovider -m gpu tests/python/kernels tests/python/training
python benches/bench_kernels.py $quick --configs "$@"
