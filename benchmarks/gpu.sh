#!/usr/bin/env bash
# One prepared GPU benchmark (H100/H200, PyTorch with CUDA only; no TensorRT, no diffusers needed). < 8 minutes.
# Writes benchmarks/results/gpu_<device>.md (and into $OUT when run through the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_bench.py --out "${OUT:-benchmarks/results}" "$@"
