#!/usr/bin/env bash
# What a session run on the GPU machine does (through the device tool, from the repo root):
# the CUDA tests, the kernel benchmark and the solvers' weights/s on the GPU. That machine has
# torch, triton, transformers, safetensors, accelerate, hypothesis and pytest, no network, and
# none of the offline data packages, so only tests and benchmarks that build their own weights run.
# Results land in $OUT (or bench/results/gpu): commit them with the device and date they state.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_models.py -k "kernel or cuda or through" \
  2>&1 | tee "$out/tests.log"
python3 bench/kernel.py ${KERNEL_ARGS:-} --json "$out/kernel.json" 2>&1 | tee "$out/kernel.md"
python3 bench/core.py --device cuda --sets synthetic --no-hqq --json "$out/core-cuda.json" 2>&1 | tee "$out/core-cuda.md"
