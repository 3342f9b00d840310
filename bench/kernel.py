"""Kernel benchmark: the fused packed-4-bit + CSR-outlier matmul against fp16 cuBLAS.

Layers: for each weight shape, batch and outlier fraction, with outliers spread evenly over
the rows or crowded into some rows as real weights have them, in one run: the time of
``easyquant.runtime.kernel.qmatmul`` with each outlier path (fused into the tiles, or the balanced
second kernel; "chosen" is the one ``outlier_mode`` picks and the ratios use), of the same
kernel on the same codes with no outliers, and of ``torch.nn.functional.linear`` on the fp16
weight; the ratios between them; and the kernel's
achieved memory bandwidth (every byte it must read: codes, scales, outliers, activations, and
the output it writes) as a share of the device's peak. On a GPU each time is the median of
``triton.testing.do_bench``, which clears the L2 cache before every call, so no weight is
served from cache. Weights are synthetic (uniform codes, random scales, outlier positions
uniform at the stated fraction), which is all the kernel's speed depends on.

Decode: tokens per second of greedy generation, batch 1, for a Llama-shaped model with
random weights in fp16 against the same model with its block linears quantized (4-bit,
per channel, n-sigma 3, ``rtn`` range: the solver does not change the speed); eager, and
compiled as Hugging Face documents it (static KV cache, ``torch.compile`` of the forward with
``fullgraph=True``, CUDA graphs via ``mode="reduce-overhead"``): the quantized linears are one
opaque custom op each (:mod:`easyquant.runtime.ops`), so the whole step is one graph.

Without a GPU it runs a reduced form on the CPU under TRITON_INTERPRET=1 (small shapes,
wall-clock timing that says nothing about GPU speed), so that it cannot rot.

    python bench/kernel.py [--quick] [--shapes 7b,70b] [--batches 1,16] [--fractions 0,0.005]
                           [--decode-model 7b|1b|tiny|none] [--decode eager,compiled]
                           [--json bench/results/kernel.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before easyquant.runtime.kernel defines its kernels

import transformers
from workloads import (
    BATCHES,
    FRACTIONS,
    SHAPES,
    markdown_table,
    quantize_blocks,
    run_meta,
    synthetic,
    timer,
    without_outliers,
)

from easyquant.eval.evaluate import generation_speed
from easyquant.runtime.kernel import OUTLIER_MODES, default_config, multiprocessors, outlier_mode, qmatmul, tile_skew
from easyquant.runtime.nn import EasyQuantLinear

# Peak DRAM bandwidth (GB/s) from the vendors' data sheets, by a substring of the device name.
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4": 2039}
DECODE_MODELS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def peak_gbps(device: str, override: float | None) -> float | None:
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def layer_rows(args: argparse.Namespace, device: str, peak: float | None) -> list[dict]:
    time_it = timer(device, args.reps)
    dtype = torch.float16 if device == "cuda" else torch.float32  # the CPU has no fast fp16 matmul
    rows = []
    for n, k in [s for key in args.shapes.split(",") for s in SHAPES[key]]:
        base = synthetic(n, k, 0.0, device)
        w16 = base.dequantize(dtype)
        cases = [(f, layout) for f in args.fractions for layout in (("uniform", "skewed") if f else ("uniform",))]
        for fraction, layout in cases:
            qw = synthetic(n, k, fraction, device, layout)
            dense, mode, skew = without_outliers(qw), outlier_mode(qw), tile_skew(qw)
            for m in args.batches:
                x = torch.randn(m, k, device=device, dtype=dtype)
                t_fp16 = time_it(lambda: torch.nn.functional.linear(x, w16))  # noqa: B023
                t_dense = time_it(lambda: qmatmul(x, dense))  # noqa: B023
                t = {o: time_it(lambda o=o: qmatmul(x, qw, outliers=o)) for o in OUTLIER_MODES}  # noqa: B023
                moved = qw.nbytes + x.numel() * x.element_size() + m * n * x.element_size()
                gbps = moved / t[mode] / 1e9
                cfg = default_config(m, n, k, multiprocessors(x.device), mode, qw.group_size)
                rows.append({
                    "shape": f"{n}x{k}", "batch": m, "outlier_fraction": qw.outlier_fraction, "layout": layout,
                    "tile_skew": skew, "mode": mode,
                    "fp16_us": t_fp16 * 1e6, "dense_only_us": t_dense * 1e6,
                    "fused_us": t["fused"] * 1e6, "balanced_us": t["balanced"] * 1e6, "kernel_us": t[mode] * 1e6,
                    "speedup_vs_fp16": t_fp16 / t[mode], "outlier_cost": t[mode] / t_dense - 1,
                    "gbps": gbps, "peak_share": gbps / peak if peak else None,
                    "config": str(cfg),
                })  # fmt: skip
                r = rows[-1]
                print(f"{r['shape']:>11} b{m:<4} {fraction:6.2%} {layout:7s} fp16 {r['fp16_us']:9.1f}us "
                      f"kernel ({mode}) {r['kernel_us']:9.1f}us x{r['speedup_vs_fp16']:.2f} "
                      f"outliers {r['outlier_cost']:+.1%}", flush=True)  # fmt: skip
    return rows


def tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> float:
    """Greedy decode speed, eager or compiled the way Hugging Face documents it (static KV cache,
    ``torch.compile(forward, fullgraph=True)``; CUDA graphs on a GPU, ``aot_eager`` on the CPU)."""
    if not compiled:
        return generation_speed(model, prompt, new_tokens)
    torch._dynamo.reset()
    model.generation_config.cache_implementation = "static"
    how = {"mode": "reduce-overhead"} if prompt.is_cuda else {"backend": "aot_eager"}
    model.forward = torch.compile(model.forward, fullgraph=True, **how)
    try:
        return generation_speed(model, prompt, new_tokens, warmup=8)
    finally:
        del model.forward  # back to the class's forward
        model.generation_config.cache_implementation = None


def decode_row(name: str, device: str, new_tokens: int, compiled: bool) -> dict:
    cfg = transformers.LlamaConfig(**DECODE_MODELS[name], vocab_size=32000, max_position_embeddings=4096)
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
        fp16 = tokens_per_s(model, prompt, new_tokens, compiled)
        fp16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        quantize_blocks(model)
        if device != "cuda":
            EasyQuantLinear.backend = "triton"  # the interpreter: exercise the kernel path on the CPU
        quant = tokens_per_s(model, prompt, new_tokens, compiled)
        EasyQuantLinear.backend = "auto"
    q_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": f"llama-{name} (random weights)", "compiled": compiled, "new_tokens": new_tokens,
            "fp16_tokens_per_s": fp16, "easyquant_tokens_per_s": quant, "speedup": quant / fp16,
            "fp16_gib": fp16_bytes / 2**30, "easyquant_gib": q_bytes / 2**30}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--quick", action="store_true", help="7B shapes, batches 1 and 16, fractions 0 and 0.5%%")
    ap.add_argument("--shapes", default="7b,70b" if on_gpu else "cpu", help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--batches", default=None, help="comma list (default: 1,2,4,8,16,32,128; CPU: 1,16)")
    ap.add_argument("--fractions", default=None, help="comma list (default: 0,0.001,0.005,0.01,0.05; CPU: 0,0.005)")
    ap.add_argument("--decode-model", default="7b" if on_gpu else "tiny", choices=[*DECODE_MODELS, "none"])
    ap.add_argument("--new-tokens", type=int, default=128 if on_gpu else 8)
    ap.add_argument(
        "--decode",
        default="eager,compiled" if on_gpu else "eager",
        help="decode runs: eager and/or compiled (static cache, torch.compile; CUDA graphs on a GPU)",
    )
    ap.add_argument("--reps", type=int, default=3, help="CPU repetitions per timing")
    ap.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth, if not in the table")
    ap.add_argument("--json", type=Path, default=Path("bench/results/kernel.json"))
    args = ap.parse_args()
    small = args.quick or not on_gpu
    args.batches = [int(b) for b in (args.batches or ("1,16" if small else ",".join(map(str, BATCHES)))).split(",")]
    default_fractions = "0,0.005" if small else ",".join(map(str, FRACTIONS))
    args.fractions = [float(f) for f in (args.fractions or default_fractions).split(",")]
    if args.quick and on_gpu:
        args.shapes = "7b"
    device = "cuda" if on_gpu else "cpu"
    peak = peak_gbps(device, args.peak_gbps)

    rows = layer_rows(args, device, peak)
    runs = [] if args.decode_model == "none" else args.decode.split(",")
    decode = [decode_row(args.decode_model, device, args.new_tokens, run == "compiled") for run in runs]

    meta, heading = run_meta(peak_gbps=peak)
    print(f"\n{heading}; 4-bit per channel, activations {'fp16' if on_gpu else 'fp32'}")
    ref = "fp16" if on_gpu else "fp32"
    head = ["shape", "batch", "outliers", "layout (tile skew)", f"{ref} matmul (us)", "dense only (us)", "fused (us)",
            "balanced (us)", "chosen", f"x {ref}", "outlier cost", "GB/s", "% of peak", "tiles"]  # fmt: skip
    print(markdown_table(head, [
        [r["shape"], r["batch"], f"{r['outlier_fraction']:.2%}", f"{r['layout']} ({r['tile_skew']:.1f})",
         f"{r['fp16_us']:.1f}", f"{r['dense_only_us']:.1f}", f"{r['fused_us']:.1f}", f"{r['balanced_us']:.1f}",
         r["mode"], f"{r['speedup_vs_fp16']:.2f}", f"{r['outlier_cost']:+.1%}", f"{r['gbps']:.1f}",
         f"{r['peak_share']:.0%}" if r["peak_share"] else "-", r["config"]]
        for r in rows
    ]))  # fmt: skip
    if decode:
        head = ["model", "run", "new tokens", f"{ref} tok/s", "easyquant tok/s", "speed-up", f"{ref} GiB",
                "easyquant GiB"]  # fmt: skip
        print("\n" + markdown_table(head, [
            [d["model"], "compiled" if d["compiled"] else "eager", d["new_tokens"], f"{d['fp16_tokens_per_s']:.1f}",
             f"{d['easyquant_tokens_per_s']:.1f}", f"{d['speedup']:.2f}", f"{d['fp16_gib']:.2f}",
             f"{d['easyquant_gib']:.2f}"]
            for d in decode
        ]))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "layers": rows, "decode": decode}, indent=1))


if __name__ == "__main__":
    main()
