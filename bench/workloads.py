"""The kernel's workloads, shared by the benchmarks that time it (``kernel.py``), tune it
(``tune.py``) and compile it (``compiled.py``): the layer shapes of 7B and 70B models, batches,
outlier fractions, synthetic quantized weights of those shapes, and how a call is timed."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from easyquant import QuantConfig, quantize_weight
from easyquant.checkpoint.targets import block_linears
from easyquant.core.packing import pack
from easyquant.core.qweight import QuantizedWeight, csr_from_mask
from easyquant.runtime.nn import swap_in_quantized

SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "70b": [(8192, 8192), (28672, 8192)],
    "cpu": [(256, 512), (512, 256)],
}
BATCHES = [1, 2, 4, 8, 16, 32, 128]
FRACTIONS = [0.0, 0.001, 0.005, 0.01, 0.05]


def synthetic(
    rows: int, cols: int, fraction: float, device: str, layout: str = "uniform", bits: int = 4, seed: int = 0
) -> QuantizedWeight:
    """Random codes and scales; outliers at ``fraction``, spread evenly over the rows
    (``uniform``) or crowded into some rows as in real weights (``skewed``: each row's share
    drawn log-normal, which puts several times the mean into the busiest 64-row tiles)."""
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, device=device, dtype=torch.uint8)
    rate = torch.full((rows, 1), fraction, device=device)
    if layout == "skewed":
        share = (2.0 * torch.randn(rows, 1, generator=g, device=device)).exp()
        rate = (fraction * share / share.mean()).clamp(max=1.0)
    mask = torch.rand(rows, cols, generator=g, device=device) < rate
    codes[mask] = 2 ** (bits - 1)  # the code of 0 where an outlier takes over
    scales = ((torch.rand(rows, 1, generator=g, device=device) + 0.5) * 2e-3).half()
    rowptr, col_idx, values = csr_from_mask(mask, torch.randn(rows, cols, generator=g, device=device) * 0.05)
    return QuantizedWeight(pack(codes, bits), scales, rowptr, col_idx, values, bits, cols, (rows, cols), torch.float16)


def quantize_blocks(model: torch.nn.Module) -> None:
    """Swap the model's block linears for 4-bit per-channel ``EasyQuantLinear`` (n-sigma 3
    outliers, ``rtn`` range: the decode benchmarks' quantized model; the solver changes no speed)."""
    config = QuantConfig(bits=4, solver="rtn", group_size=None, n_sigma=3.0, col_scale=False)
    swap_in_quantized(model, {n: quantize_weight(lin.weight.data, config, name=n) for n, lin in block_linears(model)})


def without_outliers(qw: QuantizedWeight) -> QuantizedWeight:
    """The dense part alone, as the format stores a weight without outliers (no row pointers)."""
    return replace(qw, outlier_rowptr=qw.outlier_rowptr[:0], outlier_cols=qw.outlier_cols[:0],
                   outlier_values=qw.outlier_values[:0])  # fmt: skip


def timer(device: str, reps: int) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: median of do_bench on a GPU (L2 flushed before each call), of
    wall-clock repetitions on the CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cpu


def run_meta(**extra: object) -> tuple[dict, str]:
    """What a timing run states about itself (date, machine, GPU, versions), and its heading line."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = None
    on_gpu = torch.cuda.is_available()
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": "cuda" if on_gpu else "cpu",
            "gpu": torch.cuda.get_device_name() if on_gpu else None, "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers.__version__, "interpreted": not on_gpu,
            **extra}  # fmt: skip
    where = meta["gpu"] or "CPU under TRITON_INTERPRET=1 (timings say nothing of GPU speed)"
    return meta, f"{meta['date']}, {where}, torch {meta['torch']}, triton {meta['triton']}"


def markdown_table(head: list[str], rows: list[list[object]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows])  # fmt: skip


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows``: one column per (heading, key, format string such as ``{:.2f}``)."""
    return markdown_table([h for h, _, _ in columns], [[f.format(r[k]) for _, k, f in columns] for r in rows])


def write_report(out: Path, name: str, text: str, meta: dict, rows: list[dict]) -> None:
    """``out/name.md`` (the table as printed) and ``out/name.json`` (meta and rows); prints the table."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(text)


def trial_args(doc: str, count: str, default: int) -> argparse.Namespace:
    """Arguments of a seeded trial run (fuzz, kill): how many trials, the seed, a JSON path."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument(f"--{count}", type=int, default=default)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def save_random_llama(folder: Path, **sizes: int) -> None:
    """A random Llama (seed 0, 4 heads, 2 KV heads) of the given sizes, saved as transformers saves it."""
    import transformers

    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **sizes)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def quiet_transformers() -> None:
    """No progress bars, warnings or info lines from transformers: trial runs print their own."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.simplefilter("ignore")


def trial_meta() -> tuple[dict, str]:
    """What a trial run (fuzz, kill: no timings that matter) states about itself, and its heading."""
    import os

    meta = run_meta(cpus=os.cpu_count())[0]
    heading = f"{meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}"
    return meta, heading + f", transformers {meta['transformers']}"
