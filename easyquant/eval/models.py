"""Loading a causal LM and its tokenizer for evaluation: a folder (plain or easyquant) or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kw else path
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
    return model, tok
