"""Core benchmark: one weight matrix at a time, every method side by side.

For each matrix and method: bits per weight (codes, scales, zero points, outliers and their
indices), relative reconstruction error ||W - Q[W]|| / ||W||, outlier fraction, time and
weights per second. Matrices: nn.Linear weights of SmolLM2-135M-Instruct (real weights, but
stored as GGUF Q4_1, i.e. 4-bit quantized once already) and 7B-shaped Student-t matrices.

    python bench/core.py [--quick] [--device cpu|cuda] [--sets smollm2,minilm,synthetic] [--no-hqq]
                         [--methods all|speed] [--repeat 3] [--json bench/results/core.json]

``--methods speed`` is the speed table of the issue that asks for a default faster than every
data-free peer: the default, the default with its search in torch (as on a GPU; the CPU runs a
compiled one), the previous default, ``--target-bpw`` (each matrix's setting chosen
from the menu, then quantized), HQQ g64/g128, SINQ g64/g128 and RTN, with each method's weights
per second as a ratio to HQQ g64's and SINQ g64's in the same run; its synthetic matrices are
the heavy-tailed 7B shapes 4096x4096, 4096x2048 and 2048x4096.

Times are each matrix's fastest of ``--repeat`` runs, summed: the machine's noise mostly slows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from easyquant import QuantConfig, quantize_weight
from easyquant.core import solvers
from easyquant.core.allocate import plan
from easyquant.eval.compare import PER_CHANNEL
from easyquant.eval.peers import hqq_quantize, sinq_quantize

Method = Callable[[torch.Tensor], tuple[torch.Tensor, float, float]]


def ours(per_channel: bool = True, **kw) -> Method:
    """easyquant with ``kw`` over the paper's per-channel shape, or over the defaults."""
    cfg = QuantConfig(**PER_CHANNEL | kw) if per_channel else QuantConfig(**kw)

    def run(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        q = quantize_weight(w, cfg)
        return q.dequantize(), q.bits_per_weight, q.outlier_fraction

    return run


def budget(target: float, **kw) -> Method:
    """``--target-bpw``: the matrix's setting chosen from the menu around the defaults (every
    setting scored, as the pipeline does), then the matrix quantized with it. The
    row is for time: a budget over one matrix is a one-layer knapsack, greedy on that layer's
    hull, so its bits need not come near the target as they do over a model's layers."""

    def run(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        (chosen,) = plan([("w", lambda: w)], QuantConfig(**kw), target, progress=False).values()
        q = quantize_weight(w, chosen)
        return q.dequantize(), q.bits_per_weight, q.outlier_fraction

    return run


def peer(quantize: Callable, bits: int, group: int) -> Method:
    def run(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        d, bpw = quantize(w, bits, group)
        return d, bpw, 0.0

    return run


def hqq(bits: int, group: int) -> Method:
    return peer(hqq_quantize, bits, group)


def in_torch(method: Method) -> Method:
    """``method`` with the range search in torch, as a GPU runs it: the CPU's compiled search
    (:mod:`easyquant.core.search_cpu`) switched off for the call, the same candidates tried."""

    def run(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        compiled, solvers.FUSED_NORMS = solvers.FUSED_NORMS, ()
        try:
            return method(w)
        finally:
            solvers.FUSED_NORMS = compiled

    return run


def speed_methods(bits: int) -> dict[str, Method]:
    return {
        "easyquant default (g64, n=4, column scales)": ours(False, bits=bits),
        "default, search in torch (the GPU's path)": in_torch(ours(False, bits=bits)),
        "previous default (per channel, n=3)": ours(bits=bits),
        "--target-bpw 4.25": budget(4.25 + bits - 4, bits=bits),
        "hqq g64": hqq(bits, 64),
        "hqq g128": hqq(bits, 128),
        "sinq g64": peer(sinq_quantize, bits, 64),
        "sinq g128": peer(sinq_quantize, bits, 128),
        "rtn": ours(bits=bits, solver="rtn", n_sigma=None),
    }


def methods(bits: int) -> dict[str, Method]:
    return {
        "easyquant default (g64, n=4, column scales)": ours(False, bits=bits),
        "default, outliers by savings": ours(False, bits=bits, outlier_rule="savings"),
        "rtn": ours(bits=bits, solver="rtn", n_sigma=None),
        "rtn-mse (GPTQ grid)": ours(bits=bits, solver="mse", n_sigma=None),
        "paper (n=3, Adam)": ours(bits=bits, solver="paper"),
        "search p=2 (n=3)": ours(bits=bits, solver="search", p=2.0),
        "search p=3 (n=3)": ours(bits=bits, solver="search"),
        "search p=2 (n=3, g128)": ours(bits=bits, solver="search", p=2.0, group_size=128),
        "search p=2 (n=3, g64)": ours(bits=bits, solver="search", p=2.0, group_size=64),
        "search p=2 (n=4, g128)": ours(bits=bits, solver="search", p=2.0, group_size=128, n_sigma=4.0),
        "hqq g128": hqq(bits, 128),
        "hqq g64": hqq(bits, 64),
    }


def smollm2_linears(layers: list[int]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from easyquant.eval.assets import smollm2_gguf

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    out = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        if isinstance(mod, torch.nn.Linear) and "layers" in parts and int(parts[parts.index("layers") + 1]) in layers:
            out[f"smollm2:{name.removeprefix('model.')}"] = mod.weight.detach().clone()
    return out


def minilm_linears() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from easyquant.eval.assets import minilm_dir

    tensors = load_file(minilm_dir() / "model.safetensors")
    return {f"minilm:{k}": v for k, v in tensors.items() if ".layer." in k and k.endswith(".weight") and v.dim() == 2}


def synthetic(shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for rows, cols in shapes:
        normal = torch.randn(rows, cols, generator=g)
        chi2 = sum(torch.randn(rows, cols, generator=g).square() for _ in range(4))
        t = normal / (chi2 / 4).sqrt() * 0.02
        out[f"student-t(4) {rows}x{cols}"] = t
    return out


SYNTHETIC = {
    "quick": [(1024, 1024)],
    "all": [(4096, 4096), (11008, 4096)],
    "speed": [(4096, 4096), (4096, 2048), (2048, 4096)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two real layers and one small synthetic matrix")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", default="smollm2,minilm,synthetic",
                    help="matrix sets (synthetic alone needs no data packages, e.g. on the GPU machine)")  # fmt: skip
    ap.add_argument("--no-hqq", action="store_true", help="leave out HQQ (where the hqq package is missing)")
    ap.add_argument("--methods", choices=["all", "speed"], default="all", help="the method list (see above)")
    ap.add_argument("--repeat", type=int, default=3, help="time each matrix this many times, keep the fastest")
    ap.add_argument("--json", type=Path, default=Path("bench/results/core.json"))
    args = ap.parse_args()

    sets = args.sets.split(",")
    loaders = {
        "smollm2": lambda: smollm2_linears([0] if args.quick else [0, 10, 20, 29]),
        "minilm": minilm_linears,
        "synthetic": lambda: synthetic(SYNTHETIC["quick" if args.quick else args.methods]),
    }
    mats = {k: v for name in sets for k, v in loaders[name]().items()}
    labels = {"smollm2": "SmolLM2 layers 0,10,20,29 (Q4_1 source)", "minilm": "all-MiniLM-L6-v2 (fp32 source)"}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in mats.items():
        key = labels.get(name.split(":")[0], name)
        groups.setdefault(key, {})[name] = w.to(args.device)

    rows = []
    for group_name, ws in groups.items():
        total = sum(w.numel() for w in ws.values())
        for method, fn in (speed_methods if args.methods == "speed" else methods)(args.bits).items():
            if args.no_hqq and method.startswith("hqq"):
                continue
            if args.device == "cuda":
                fn(next(iter(ws.values())))  # warm-up: kernels compiled and cached before the clock starts
            err2 = ref2 = bits = outl = 0.0
            seconds = 0.0
            for w in ws.values():
                fastest = float("inf")
                for _ in range(args.repeat):  # the same result each time: quantization is deterministic
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    d, bpw, frac = fn(w)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    fastest = min(fastest, time.perf_counter() - t0)
                seconds += fastest
                err2 += (d.float() - w).square().sum().item()
                ref2 += w.square().sum().item()
                bits += bpw * w.numel()
                outl += frac * w.numel()
            rows.append(
                {
                    "matrices": group_name,
                    "method": method,
                    "bits_per_weight": bits / total,
                    "rel_error": (err2 / ref2) ** 0.5,
                    "outlier_fraction": outl / total,
                    "seconds": seconds,
                    "weights_per_second": total / seconds,
                }
            )
            r = rows[-1]
            print(
                f"{group_name:42s} {method:24s} {r['bits_per_weight']:6.3f} {r['rel_error']:.5f} "
                f"{r['outlier_fraction']:.3%} {seconds:8.2f}s",
                flush=True,
            )

    meta = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "bits": args.bits,
        "repeat": args.repeat,
        "note": "SmolLM2 weights come from a GGUF Q4_1 file: they were 4-bit quantized once (blocks of 32).",
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print()
    print(f"{meta['date']}, {meta['machine']}, {meta['threads']} threads, device {args.device}, {args.bits}-bit")
    # Speed as a ratio to the peers measured in the same run, on the same matrices.
    for r in rows:
        for peer_name in ("hqq g64", "sinq g64"):
            ref = next((x for x in rows if x["matrices"] == r["matrices"] and x["method"] == peer_name), None)
            r[f"speed_vs_{peer_name.replace(' ', '_')}"] = ref and r["weights_per_second"] / ref["weights_per_second"]
    print(
        "| matrices | method | bits/weight | rel. error | outliers | time (s) | Mweights/s | x HQQ g64 | x SINQ g64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("speed_vs_hqq_g64", "speed_vs_sinq_g64"))
        print(
            f"| {r['matrices']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['rel_error']:.5f} | "
            f"{r['outlier_fraction']:.3%} | {r['seconds']:.2f} | {r['weights_per_second'] / 1e6:.2f} | {ratios} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
