#!/usr/bin/env bash
# What a session run on the GPU machine does (through the device tool, from the repo root):
# the CUDA tests, the kernel benchmark and the solvers' weights/s on the GPU. That machine has
# torch, triton, transformers, safetensors, accelerate, hypothesis and pytest, no network, and
# none of the offline data packages, so only tests and benchmarks that build their own weights run.
# Steps (default: all, in order): tests, kernel-7b, decode, tune, kernel-70b, core. The device tool allows
# 600 s a call: give each step its own call (scripts/gpu_session.sh kernel-7b).
# Results land in $OUT (or bench/results/gpu): commit them with the device and date they state.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$out/device.txt"
for step in ${*:-tests kernel-7b decode tune kernel-70b core}; do
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_compile.py tests/test_models.py -k "kernel or cuda or through or compile or opcheck" \
             2>&1 | tee "$out/tests.log" ;;
    kernel-7b) python3 bench/kernel.py --shapes 7b --decode-model none ${KERNEL_ARGS:-} --json "$out/kernel-7b.json" \
                 2>&1 | tee "$out/kernel-7b.md" ;;
    decode) python3 bench/kernel.py --shapes 7b --batches 1 --fractions 0.005 --decode eager,compiled \
              --json "$out/decode.json" 2>&1 | tee "$out/decode.md" ;;
    tune) python3 bench/tune.py --json "$out/tune.json" 2>&1 | tee "$out/tune.md" ;;
    kernel-70b) python3 bench/kernel.py --shapes 70b --decode-model none ${KERNEL_ARGS:-} --json "$out/kernel-70b.json" \
                  2>&1 | tee "$out/kernel-70b.md" ;;
    core) python3 bench/core.py --device cuda --sets synthetic --no-hqq --json "$out/core-cuda.json" 2>&1 \
            | tee "$out/core-cuda.md" ;;
    *) echo "unknown step $step (tests, kernel-7b, decode, tune, kernel-70b, core)" >&2; exit 2 ;;
  esac
done
