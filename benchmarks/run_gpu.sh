#!/usr/bin/env bash
# Re-measure the training step on a GPU machine in a few minutes (see benchmarks/README.md).
# Needs python3 with a CUDA torch, transformers, accelerate, safetensors. diffusers is installed from a wheel
# in .whl/ when present (a machine without internet), else expected installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sae-site .whl/*.whl
  export PYTHONPATH=/tmp/sae-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout ${BENCH_TIMEOUT:-460} python3 benchmarks/step_benchmark.py --out "$out" "$@"
