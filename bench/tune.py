"""Tile search for the kernel: what ``default_config`` should pick, measured on the GPU.

For each layer shape and batch, on synthetic 4-bit weights with 0.5% outliers crowded into
some rows (the outlier path ``outlier_mode`` picks for them): start from the tiles
``default_config`` picks (one-row decode also tries thin tiles without split-K, two moves
away), then vary one launch parameter at a time (rows, columns and depth of a tile, split-K,
warps, pipeline stages), keep a change when it is at least 2% faster and gives the same output
as the default (a config that fails to compile or disagrees is reported and skipped), and go
round again until nothing helps or ``--rounds`` are done. Prints the best config per case
against the default and against fp16 cuBLAS, timed in the same run (``do_bench``, L2
flushed), and writes JSON. One GPU call tunes the 7B shapes; the results are
for a person to fold into ``default_config``.

Without a GPU a reduced form runs on the CPU under TRITON_INTERPRET=1 (a small shape, few
choices; its timings say nothing about GPU speed), so that it cannot rot.

    python bench/tune.py [--shapes 7b] [--batches 1,4,16,32,128] [--rounds 2] [--json bench/results/tune.json]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before easyquant.runtime.kernel defines its kernels

from workloads import SHAPES, markdown_table, run_meta, synthetic, timer

from easyquant.core.qweight import QuantizedWeight
from easyquant.runtime.kernel import KernelConfig, default_config, multiprocessors, outlier_mode, qmatmul

GPU_CHOICES = {"block_n": [16, 32, 64, 128], "block_k": [32, 64, 128, 256], "split_k": [1, 2, 4, 8, 16],
               "num_warps": [2, 4, 8], "num_stages": [2, 3, 4]}  # fmt: skip
CPU_CHOICES = {"block_n": [16, 64], "split_k": [1, 4]}  # none the default: 4 neighbours


def neighbours(cfg: KernelConfig, m: int, choices: dict[str, list[int]]) -> list[KernelConfig]:
    """Configs that differ from ``cfg`` in one parameter (block_m only past 16 rows)."""
    options = dict(choices)
    if m > 16 and "block_k" in choices:  # the GPU grid: tensor-core tiles of 16 to 64 rows
        options["block_m"] = [b for b in (16, 32, 64) if b <= max(16, 1 << (m - 1).bit_length())]
    out = []
    for field, values in options.items():
        for v in values:
            if v != getattr(cfg, field):
                out.append(replace(cfg, **{field: v}))
    return out


def seeds(start: KernelConfig, choices: dict[str, list[int]]) -> list[KernelConfig]:
    """Thin decode tiles with no split-K (no fp32 buffer to clear and cast): two moves away from
    the default, which one-at-a-time search could miss."""
    if start.block_m != 1 or "block_k" not in choices:
        return []
    return [replace(start, block_n=n, block_k=256, split_k=1) for n in (16, 32)]


def agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same output up to the summation order a different tiling or split brings."""
    return bool((y.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max() + 1e-3)


def search(x: torch.Tensor, qw: QuantizedWeight, start: KernelConfig, time_it: Callable, rounds: int,
           choices: dict[str, list[int]]) -> dict:  # fmt: skip
    ref = qmatmul(x, qw, config=start)
    best, t_best = start, time_it(lambda: qmatmul(x, qw, config=start))
    t_default, tried, rejected = t_best, {start}, []
    for r in range(rounds):
        improved = False
        for cand in (seeds(start, choices) if r == 0 else []) + neighbours(best, x.shape[0], choices):
            if cand in tried:
                continue
            tried.add(cand)
            try:
                y = qmatmul(x, qw, config=cand)
            except Exception as e:  # out of shared memory or registers: this config cannot run here
                rejected.append({"config": asdict(cand), "why": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            if not agrees(y, ref):
                rejected.append({"config": asdict(cand), "why": "output differs from the default config's"})
                continue
            t = time_it(lambda c=cand: qmatmul(x, qw, config=c))
            if t < 0.98 * t_best:
                best, t_best, improved = cand, t, True
        if not improved:
            break
    return {"default": asdict(start), "default_us": t_default * 1e6, "best": asdict(best), "best_us": t_best * 1e6,
            "tried": len(tried), "rejected": rejected}  # fmt: skip


def tiles(c: dict) -> str:
    return str(KernelConfig(**c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--shapes", default="7b" if on_gpu else "cpu", help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--batches", default="1,4,16,32,128" if on_gpu else "1")
    ap.add_argument("--rounds", type=int, default=2 if on_gpu else 1)
    ap.add_argument("--json", type=Path, default=Path("bench/results/tune.json"))
    args = ap.parse_args()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float16 if on_gpu else torch.float32
    choices = GPU_CHOICES if on_gpu else CPU_CHOICES
    shapes = [s for key in args.shapes.split(",") for s in SHAPES[key]][: None if on_gpu else 1]
    time_it = timer(device, reps=1)
    rows = []
    for n, k in shapes:
        qw = synthetic(n, k, 0.005, device, "skewed")
        mode = outlier_mode(qw)
        w16 = qw.dequantize(dtype)
        for m in (int(b) for b in args.batches.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            start = default_config(m, n, k, multiprocessors(x.device), mode, qw.group_size)
            r = {"shape": f"{n}x{k}", "batch": m, "mode": mode,
                 "fp16_us": time_it(lambda: torch.nn.functional.linear(x, w16)) * 1e6,  # noqa: B023
                 **search(x, qw, start, time_it, args.rounds, choices)}  # fmt: skip
            rows.append(r)
            print(f"{r['shape']:>11} b{m:<4} default {tiles(r['default'])} {r['default_us']:.1f}us -> "
                  f"{tiles(r['best'])} {r['best_us']:.1f}us ({r['tried']} tried)", flush=True)  # fmt: skip

    meta, heading = run_meta()
    ref = "fp16" if on_gpu else "fp32"
    print(f"\n{heading}; 4-bit per channel, 0.5% outliers (skewed)")
    head = ["shape", "batch", "outliers", "default tiles", "us", "best tiles", "us", "gain", f"best x {ref}", "tried"]
    print(markdown_table(head, [
        [r["shape"], r["batch"], r["mode"], tiles(r["default"]), f"{r['default_us']:.1f}", tiles(r["best"]),
         f"{r['best_us']:.1f}", f"{r['default_us'] / r['best_us']:.2f}", f"{r['fp16_us'] / r['best_us']:.2f}",
         r["tried"]]
        for r in rows
    ]))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
