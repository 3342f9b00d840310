"""Running the units of a quantization: one weight each, read, quantized and written to its own
file, in this process, in worker processes (one per GPU on CUDA), or as Ray tasks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.fold import Scales, quantize_folded
from ..core.quantize import QuantConfig
from ..errors import EasyQuantError
from ..progress import progress_bar
from .st_io import Entry, write_safetensors
from .targets import Target

Unit = tuple[Target, Path, QuantConfig, Scales]  # Scales: the weight's fold (easyquant.core.fold)
EXECUTORS = ("local", "ray")
_worker_device: str = "cpu"


def _init_worker(devices: list[str], counter, threads: int) -> None:
    global _worker_device
    with counter.get_lock():
        _worker_device = devices[counter.value % len(devices)]
        counter.value += 1
    torch.set_num_threads(threads)


def quantize_unit(
    target: Target, config: QuantConfig, path: Path, fold: Scales = (None, None), device: str | None = None
) -> dict:
    """Quantize one weight (with its fold) into its unit file; returns its summary row."""
    t0 = time.perf_counter()
    source = target.source
    dev = device or _worker_device
    fold = (None if fold[0] is None else fold[0].to(dev), None if fold[1] is None else fold[1].to(dev))
    qw = quantize_folded(source.load().to(dev), config, fold, source.name)
    row = {
        "module": target.module,
        "rows": qw.shape[0],
        "cols": qw.shape[1],
        "outliers": qw.outlier_count,
        "bits_per_weight": qw.bits_per_weight,
        "bits": qw.bits,
        "group_size": qw.group_size,
        **({"expert": True} if target.expert else {}),
        **({"folded": True} if fold[1] is not None else {}),
        "seconds": time.perf_counter() - t0,
    }
    tensors = qw.to("cpu").tensors()
    entries = [Entry(f"{target.module}.{k}", t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    write_safetensors(path, entries, {"row": json.dumps({k: v for k, v in row.items() if k != "seconds"})})
    return row


def read_row(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["row"])


def _quantize_args(args: tuple) -> dict:
    return quantize_unit(*args)


def _local_results(todo: list[Unit], workers: int, device: str) -> Iterator[dict]:
    if workers <= 1:
        for target, path, config, fold in todo:
            yield quantize_unit(target, config, path, fold, device)
        return
    import multiprocessing as mp

    # A fork server imports this module once and forks every worker from it: one import per run
    # instead of one per worker (spawn), and no fork of a parent whose threads (OpenMP, CUDA) run.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device == "cuda" else [device]
    threads = max(1, (os.cpu_count() or 1) // workers)
    # Leaving the block terminates the workers: a failing tensor stops the run at once.
    with ctx.Pool(workers, _init_worker, (devices, ctx.Value("i", 0), threads)) as pool:
        yield from pool.imap_unordered(_quantize_args, [(t, config, path, fold) for t, path, config, fold in todo])


def _ray_results(todo: list[Unit], device: str) -> Iterator[dict]:
    """Tensors as Ray tasks: joins the cluster at RAY_ADDRESS (or the one already initialised, or
    starts a local one). Every node must see the source and OUT at the same paths."""
    try:
        import ray
    except ImportError:
        raise EasyQuantError("--executor ray needs Ray: pip install 'easyquant[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    task = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(quantize_unit)
    pending = [task.remote(target, config, path, fold, device) for target, path, config, fold in todo]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:  # a failing tensor stops the run at once
        for ref in pending:
            ray.cancel(ref, force=True)


def run_units(todo: list[Unit], workers: int, device: str, executor: str, progress: bool) -> None:
    total = sum(t.in_features * t.out_features for t, *_ in todo)
    done_weights, t0 = 0, time.perf_counter()
    results = _ray_results(todo, device) if executor == "ray" else _local_results(todo, workers, device)
    with progress_bar(total=len(todo), unit="tensor", desc="quantizing", disable=not progress or not todo) as bar:
        for row in results:
            done_weights += row["rows"] * row["cols"]
            rate = done_weights / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(
                f"{rate / 1e6:.2f} Mweights/s, {done_weights / max(total, 1):.0%} of weights", refresh=False
            )
            bar.update()
