"""CPU inference benchmark: 4-bit easyquant weights against the dense model, on this CPU.

Layers: for each weight shape and batch, in one run, the time of ``torch.nn.functional.linear``
on the dense weight in fp32 and in bf16, and of ``EasyQuantLinear`` on the same 4-bit codes
(per channel, synthetic codes and scales; 0.5% outliers by default): in bf16, where it runs
torch's CPU int4 kernel up to ``CPU_INT4_MAX_ROWS`` rows ("path"), and the same in bf16 with
``backend="torch"`` (dequantize, then a dense matmul: what longer inputs do), and in fp32,
where it dequantizes the weight at every call. Each
time is the median of ``--reps`` wall-clock calls after a warm-up call; ratios are against the
fp32 and the bf16 dense matmul of the same run.

Decode: tokens per second of greedy generation, batch 1, of SmolLM2-135M-Instruct (the offline
GGUF: its weights were 4-bit quantized once already, which changes nothing about speed) in
fp32 and bf16, against the same model with its block linears quantized to 4 bits (per channel,
n-sigma 3 outliers, ``rtn`` range: the solver does not change the speed) in fp32 and bf16.
``--model tiny`` uses a random two-layer Llama instead (the tests' reduced form).

    python bench/cpu.py [--shapes smollm2,7b] [--batches 1,4,16,128] [--fraction 0.005]
                        [--model smollm2|tiny|none] [--new-tokens 32] [--json bench/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
import transformers
from workloads import SHAPES, markdown_table, quantize_blocks, synthetic, timer

from easyquant.eval.evaluate import generation_speed
from easyquant.runtime import cpu_kernel
from easyquant.runtime.nn import EasyQuantLinear

LAYER_SHAPES = {"smollm2": [(576, 576), (1536, 576), (576, 1536)], **SHAPES}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_layer(layer: EasyQuantLinear, dense: dict[str, torch.Tensor], m: int, reps: int) -> dict[str, float]:
    """Microseconds per call of the dense matmuls and of ``layer``, in each dtype, for ``m`` rows."""
    time_it = timer("cpu", reps)
    x = {name: torch.randn(m, layer.in_features).to(dtype) for name, dtype in DTYPES.items()}
    t = {f"dense_{d}_us": time_it(lambda d=d: torch.nn.functional.linear(x[d], dense[d])) for d in DTYPES}
    t |= {f"easyquant_{d}_us": time_it(lambda d=d: layer(x[d])) for d in DTYPES}
    path = layer.path(x["bf16"])
    layer.backend = "torch"
    t["easyquant_bf16_dequantize_us"] = time_it(lambda: layer(x["bf16"]))
    layer.backend = "auto"
    return {key: seconds * 1e6 for key, seconds in t.items()} | {"bf16_path": path}


def layer_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n, k in [s for key in args.shapes.split(",") for s in LAYER_SHAPES[key]]:
        qw = synthetic(n, k, args.fraction, "cpu")
        layer = EasyQuantLinear.from_quantized(qw)
        dense = {name: qw.dequantize(dtype) for name, dtype in DTYPES.items()}
        for m in args.batches:
            r = {"shape": f"{n}x{k}", "batch": m, "outlier_fraction": qw.outlier_fraction}
            rows.append(r | time_layer(layer, dense, m, args.reps))
            r = rows[-1]
            print(f"{r['shape']:>11} b{m:<4} dense fp32 {r['dense_fp32_us']:9.1f}us bf16 {r['dense_bf16_us']:9.1f}us "
                  f"easyquant bf16 {r['easyquant_bf16_us']:9.1f}us fp32 {r['easyquant_fp32_us']:9.1f}us",
                  flush=True)  # fmt: skip
    return rows


def load(name: str) -> transformers.PreTrainedModel:
    if name == "tiny":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()
    from easyquant.eval.assets import smollm2_gguf
    from easyquant.eval.models import load_causal_lm

    return load_causal_lm(smollm2_gguf())[0]


def decode_rows(name: str, new_tokens: int) -> list[dict]:
    model = load(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def speeds(weights: str) -> dict[tuple[str, str], float]:
        return {(weights, d): generation_speed(model.to(dtype), prompt, new_tokens) for d, dtype in DTYPES.items()}

    with torch.no_grad():
        dense = speeds("dense")
        model.to(torch.float32)
        quantize_blocks(model)
        speed = dense | speeds("easyquant")
    label = "SmolLM2-135M-Instruct (GGUF Q4_1 weights)" if name == "smollm2" else f"llama-{name} (random weights)"
    return [{"model": label, "weights": w, "dtype": d, "new_tokens": new_tokens, "tokens_per_s": v,
             "vs_dense_fp32": v / speed[("dense", "fp32")]} for (w, d), v in speed.items()]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,7b", help=f"comma list of {list(LAYER_SHAPES)}")
    ap.add_argument("--batches", default="1,4,16,128")
    ap.add_argument("--fraction", type=float, default=0.005, help="outlier fraction (default 0.005)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "none"], help="decode model")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="repetitions per timing (median)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/cpu.json"))
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    layers = layer_rows(args)
    decode = [] if args.model == "none" else decode_rows(args.model, args.new_tokens)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "int4_kernel": cpu_kernel.supported(),
            "reps": args.reps}  # fmt: skip
    print(f"\n{meta['date']}, CPU ({meta['threads']} threads, {meta['machine']}), torch {meta['torch']}; "
          f"4-bit per channel, {args.fraction:.2%} outliers; median of {args.reps} calls")  # fmt: skip
    head = ["shape", "batch", "dense fp32 (us)", "dense bf16 (us)", "easyquant bf16 (us)", "path", "x dense fp32",
            "x dense bf16", "bf16 dequantize (us)", "easyquant fp32 (us)", "x dense fp32"]  # fmt: skip
    print(markdown_table(head, [
        [r["shape"], r["batch"], f"{r['dense_fp32_us']:.1f}", f"{r['dense_bf16_us']:.1f}",
         f"{r['easyquant_bf16_us']:.1f}", r["bf16_path"], f"{r['dense_fp32_us'] / r['easyquant_bf16_us']:.2f}",
         f"{r['dense_bf16_us'] / r['easyquant_bf16_us']:.2f}", f"{r['easyquant_bf16_dequantize_us']:.1f}",
         f"{r['easyquant_fp32_us']:.1f}", f"{r['dense_fp32_us'] / r['easyquant_fp32_us']:.2f}"]
        for r in layers
    ]))  # fmt: skip
    if decode:
        head = ["model", "weights", "dtype", "new tokens", "tokens/s", "x dense fp32"]
        print("\n" + markdown_table(head, [
            [d["model"], d["weights"], d["dtype"], d["new_tokens"], f"{d['tokens_per_s']:.1f}",
             f"{d['vs_dense_fp32']:.2f}"]
            for d in decode
        ]))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "layers": layers, "decode": decode}, indent=1))


if __name__ == "__main__":
    main()
