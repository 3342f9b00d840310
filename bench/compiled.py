"""What the compiler makes of the kernels for an H100, without an H100.

Every launch ``easyquant.runtime.kernel.qmatmul`` would make for the benchmark's layer shapes and
batches (the same planner, the tile sizes ``default_config`` picks for the GPU's SM count,
both outlier paths) and the dequantizer, plus every bit width and scale layout once, are
compiled ahead of time for ``sm_90`` by ``easyquant.runtime.kernel.aot`` with the ptxas in Triton's
wheel, and read back from the cubin: registers and local memory per thread (spills), shared
memory, resident warps per SM that the registers allow, tensor-core instructions, global
loads by width, warp shuffles and atomics. These are static facts about the machine code
(instruction counts are per kernel, not per executed iteration); they prove the kernels
compile for the GPU and show their shape, and say nothing of speed: ``kernel.py`` measures
that on the GPU.

    python bench/compiled.py [--quick] [--arch 90] [--sms 132] [--json bench/results/compiled.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from datetime import date
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter, before easyquant.runtime.kernel loads

import torch
import triton
from workloads import BATCHES, SHAPES, markdown_table, synthetic

from easyquant.core.packing import pack
from easyquant.core.qweight import QuantizedWeight
from easyquant.runtime.kernel import OUTLIER_MODES, default_config, plan_dequantize, plan_qmatmul
from easyquant.runtime.kernel.aot import CompiledLaunch, compile_launch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def row(what: dict, c: CompiledLaunch) -> dict:
    return {
        **what, "kernel": c.kernel.strip("_"), "registers": c.registers, "stack_bytes": c.stack_bytes,
        "shared_kib": c.shared_bytes / 1024, "warps_per_sm": c.warps_per_sm_by_registers(),
        "tensor_cores": c.tensor_cores(), "pipelined": c.pipelined(), "loads_by_bits": c.global_loads(),
        "shuffles": c.count("SHFL"), "atomics": c.count("RED.", "REDG", "ATOM"),
    }  # fmt: skip


def widths(rows: int, cols: int) -> list[tuple[str, QuantizedWeight]]:
    """One weight per bit width 2-8, and groups of 128 and ragged ones at 4 bits, with 0.5% outliers."""
    base = synthetic(rows, cols, 0.005, "cpu")
    out = [(f"{b}-bit", replace(base, packed=pack(torch.randint(0, 2**b, (rows, cols), dtype=torch.uint8), b), bits=b))
           for b in range(2, 9)]  # fmt: skip
    for group in (128, 100):
        out.append(
            (f"4-bit g{group}", replace(base, scales=base.scales.repeat(1, -(-cols // group)), group_size=group))
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one 7B shape, batches 1, 16 and 128, fp16")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors that split-K sizes for (H100 SXM: 132)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/compiled.json"))
    args = ap.parse_args()
    shapes = SHAPES["7b"][:1] if args.quick else SHAPES["7b"] + SHAPES["70b"]
    batches = [1, 16, 128] if args.quick else BATCHES
    dtypes = ["fp16"] if args.quick else list(DTYPES)

    rows = []

    def add(what: dict, launches: list) -> None:
        for launch in launches:
            rows.append(row(what, compile_launch(launch, args.arch)))
            r = rows[-1]
            print(
                f"{r['kernel']:18s} {r['shape']:>10} b{r['batch']:<4} {r['dtype']} {r['weight']:15s} "
                f"{r['registers']:3d} regs, {r['stack_bytes']} B stack, {r['tensor_cores']}",
                flush=True,
            )

    for n, k in shapes:
        qw = synthetic(n, k, 0.005, "cpu", "skewed")
        for dt in dtypes:
            dtype = DTYPES[dt]
            for m in batches:
                x = torch.zeros(m, k, dtype=dtype)
                for mode in OUTLIER_MODES:
                    cfg = default_config(m, n, k, args.sms, mode, qw.group_size)
                    add({"shape": f"{n}x{k}", "batch": m, "dtype": dt, "weight": f"4-bit {mode}", "config": str(cfg)},
                        plan_qmatmul(x, qw, cfg)[1])  # fmt: skip
            add({"shape": f"{n}x{k}", "batch": "-", "dtype": dt, "weight": "4-bit", "config": "n32 k128"},
                [plan_dequantize(qw, dtype)[1]])  # fmt: skip
    n, k = shapes[0]
    for name, qw in widths(n, k):
        for m in (1, 16):
            x = torch.zeros(m, k, dtype=torch.float16)
            cfg = default_config(m, n, k, args.sms, group=qw.group_size)
            add({"shape": f"{n}x{k}", "batch": m, "dtype": "fp16", "weight": name, "config": str(cfg)},
                plan_qmatmul(x, qw, cfg)[1])  # fmt: skip

    meta = {"date": date.today().isoformat(), "target": f"sm_{args.arch}", "sms": args.sms,
            "triton": triton.__version__, "torch": torch.__version__, "host": platform.platform()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows, meta))


def table(rows: list[dict], meta: dict) -> str:
    head = ["kernel", "shape", "batch", "dtype", "weight", "config", "regs", "stack B", "smem KiB", "warps/SM",
            "tensor cores", "async copies", "global loads (bits: count)", "shuffles", "atomics"]  # fmt: skip
    cells = [[r["kernel"], r["shape"], r["batch"], r["dtype"], r["weight"], r["config"], r["registers"],
              r["stack_bytes"], f"{r['shared_kib']:.1f}", r["warps_per_sm"], r["tensor_cores"],
              "yes" if r["pipelined"] else "-", " ".join(f"{b}:{n}" for b, n in r["loads_by_bits"].items()),
              r["shuffles"], r["atomics"]]
             for r in rows]  # fmt: skip
    return (
        f"Compiled for {meta['target']} by Triton {meta['triton']} on {meta['host']} (no GPU), {meta['date']}. "
        f"Each row is one launch as qmatmul plans it, with the tiles default_config picks for {meta['sms']} SMs, "
        "on synthetic weights with 0.5% outliers (crowded into some rows for the 4-bit sweeps), compiled by "
        "Triton's ptxas and read back with cuobjdump and nvdisasm. Async copies: global loads issued ahead "
        "(cp.async). Counts are static instructions, not executed ones; nothing here measures speed.\n\n"
        + markdown_table(head, cells)
    )


if __name__ == "__main__":
    main()
