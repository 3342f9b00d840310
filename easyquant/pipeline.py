"""Whole models: a Hugging Face checkpoint in, an easyquant safetensors checkpoint out.

Two stages, both streamed (one tensor in memory per worker):

1. Each target Linear weight is read memory-mapped, quantized and written to its own file
   under ``OUT/.easyquant-work/`` (atomically). Workers run in parallel; a file already there
   is a finished unit, which is what makes an interrupted run resumable.
2. The checkpoint is assembled: shards of the quantized and untouched tensors in key order,
   the index, tokenizer files, a summary, and ``config.json`` last, so a folder without it is
   visibly unfinished. Then the work folder is removed.

The same input and settings give a bit-identical checkpoint, whatever the worker count and
however often the run was interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .errors import EasyQuantError
from .quantize import QuantConfig, quantize_weight
from .source import DTYPE_OF, INDEX, Source, TensorRef, open_source
from .st_io import Entry, atomic_write_bytes, atomic_write_json, write_safetensors
from .targets import Target, find_targets

FORMAT_VERSION = 1
WORK_DIR = ".easyquant-work"
SUMMARY = "easyquant_summary.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SKIP_COPY = {"config.json", INDEX, "pytorch_model.bin.index.json", SUMMARY}


@dataclass(frozen=True)
class Options:
    """Everything that decides the output, beside the quantizer settings."""

    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_bytes: int = 2 * 1024**3


@dataclass
class Summary:
    out: Path
    layers: list[dict] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0

    @property
    def quantized_weights(self) -> int:
        return sum(r["rows"] * r["cols"] for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in self.layers) / max(self.quantized_weights, 1)

    @property
    def outlier_fraction(self) -> float:
        return sum(r["outliers"] for r in self.layers) / max(self.quantized_weights, 1)

    def line(self) -> str:
        return (
            f"{len(self.layers)} linear layers, {self.quantized_weights / 1e6:.1f}M weights at "
            f"{self.bits_per_weight:.3f} bits/weight ({self.outlier_fraction:.3%} outliers); "
            f"checkpoint {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB"
        )

    def markdown(self) -> str:
        rows = [
            f"| {r['module']} | {r['rows']}x{r['cols']} | {r['bits_per_weight']:.3f} | {r['outliers']} | "
            f"{r['outliers'] / (r['rows'] * r['cols']):.3%} |"
            for r in self.layers
        ]
        return "\n".join(
            [
                "# easyquant summary",
                "",
                self.line(),
                "",
                "| module | shape | bits/weight | outliers | outlier fraction |",
                "|---|---|---|---|---|",
                *rows,
                "",
            ]
        )


def _unit_path(work: Path, target: Target) -> Path:
    return work / "layers" / f"{target.module}.safetensors"


Unit = tuple[TensorRef, Target, Path]
EXECUTORS = ("local", "ray")
_worker_device: str = "cpu"


def _init_worker(devices: list[str], counter, threads: int) -> None:
    global _worker_device
    with counter.get_lock():
        _worker_device = devices[counter.value % len(devices)]
        counter.value += 1
    torch.set_num_threads(threads)


def quantize_unit(ref: TensorRef, target: Target, config: QuantConfig, path: Path, device: str | None = None) -> dict:
    """Quantize one weight into its unit file; returns its summary row."""
    t0 = time.perf_counter()
    qw = quantize_weight(ref.load().to(device or _worker_device), config, name=ref.key)
    row = {
        "module": target.module,
        "rows": qw.shape[0],
        "cols": qw.shape[1],
        "outliers": qw.outlier_count,
        "bits_per_weight": qw.bits_per_weight,
        "seconds": time.perf_counter() - t0,
    }
    tensors = qw.to("cpu").tensors()
    entries = [Entry(f"{target.module}.{k}", t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    write_safetensors(path, entries, {"row": json.dumps({k: v for k, v in row.items() if k != "seconds"})})
    return row


def _read_row(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["row"])


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> Path:
    work = out / WORK_DIR
    marker = work / "settings.json"
    if out.exists() and any(out.iterdir()):
        resumable = marker.is_file() and json.loads(marker.read_text()) == settings
        if overwrite:
            shutil.rmtree(out)
        elif not resumable:
            why = "an unfinished run with other settings" if marker.is_file() else "files"
            raise EasyQuantError(f"{out} already holds {why}; choose an empty folder or pass --overwrite")
    (work / "layers").mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_json(marker, settings)
    return work


def _local_results(todo: list[Unit], config: QuantConfig, workers: int, device: str) -> Iterator[dict]:
    if workers <= 1:
        for ref, target, path in todo:
            yield quantize_unit(ref, target, config, path, device)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device == "cuda" else [device]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, ctx, _init_worker, (devices, ctx.Value("i", 0), threads)) as pool:
        futures = [pool.submit(quantize_unit, ref, target, config, path) for ref, target, path in todo]
        for fut in as_completed(futures):
            yield fut.result()


def _ray_results(todo: list[Unit], config: QuantConfig, device: str) -> Iterator[dict]:
    """Tensors as Ray tasks: joins the cluster at RAY_ADDRESS (or the one already initialised, or
    starts a local one). Every node must see the source and OUT at the same paths."""
    try:
        import ray
    except ImportError:
        raise EasyQuantError("--executor ray needs Ray: pip install 'easyquant[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    task = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(quantize_unit)
    pending = [task.remote(ref, target, config, path, device) for ref, target, path in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _run_units(todo: list[Unit], config: QuantConfig, workers: int, device: str, executor: str, progress: bool) -> None:
    total = sum(t.in_features * t.out_features for _, t, _ in todo)
    done_weights, t0 = 0, time.perf_counter()
    results = _ray_results(todo, config, device) if executor == "ray" else _local_results(todo, config, workers, device)
    with tqdm(total=len(todo), unit="tensor", desc="quantizing", disable=not progress or not todo) as bar:
        for row in results:
            done_weights += row["rows"] * row["cols"]
            rate = done_weights / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f} Mweights/s, {done_weights / max(total, 1):.0%} of weights")
            bar.update()


def _output_entries(source: Source, targets: list[Target], work: Path) -> list[Entry]:
    by_weight = {t.weight_key: t for t in targets}
    entries = []
    for key in sorted(source.tensors):
        ref = source.tensors[key]
        target = by_weight.get(key)
        if target is None:
            entries.append(Entry(key, ref.dtype, ref.shape, ref.load))
            continue
        path = _unit_path(work, target)
        with safe_open(path, "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                unit = TensorRef(name, path, DTYPE_OF[sl.get_dtype()], tuple(sl.get_shape()))
                entries.append(Entry(name, unit.dtype, unit.shape, unit.load))
    return entries


def _write_shards(out: Path, entries: list[Entry], max_bytes: int) -> int:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, tqdm(shards, desc="writing shards", unit="shard", disable=n == 1), strict=True):
        write_safetensors(out / name, shard, {"format": "pt"})
    if n > 1:
        weight_map = {e.name: name for name, shard in zip(names, shards, strict=True) for e in shard}
        atomic_write_json(
            out / INDEX, {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        )
    return sum((out / name).stat().st_size for name in names)


def quantization_config_dict(config: QuantConfig, options: Options, layers: list[dict]) -> dict:
    return {
        "quant_method": "easyquant",
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        "skip": list(options.skip),
        "include": list(options.include),
        "modules": {r["module"]: {"outliers": r["outliers"]} for r in layers},
    }


def quantize_model(
    src: str | Path,
    out: str | Path,
    config: QuantConfig | None = None,
    options: Options | None = None,
    *,
    workers: int = 1,
    device: str = "cpu",
    executor: str = "local",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Summary:
    """Quantize the checkpoint at ``src`` (folder or .gguf) into the folder ``out``.

    Resumable: run the same call again after an interruption and it continues. ``executor``
    is ``local`` (``workers`` processes; on CUDA one per GPU) or ``ray`` (tasks on a Ray cluster).
    """
    if executor not in EXECUTORS:
        raise EasyQuantError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    config, options = config or QuantConfig(), options or Options()
    out = Path(out)
    if device == "cuda" and not torch.cuda.is_available():
        raise EasyQuantError("--device cuda was asked for, but torch sees no CUDA device")
    settings = json.loads(
        json.dumps(
            {
                "src": str(Path(src).resolve()),
                "config": config.to_dict(),
                "options": asdict(options),
                "format_version": FORMAT_VERSION,
            }
        )
    )
    try:
        work = _prepare_out(out, settings, overwrite)
        source = open_source(src, work / "staging", allow_pickle)
        targets = find_targets(source, options.skip, options.include)
        todo = [
            (source.tensors[t.weight_key], t, _unit_path(work, t)) for t in targets if not _unit_path(work, t).is_file()
        ]
        if device == "cuda":
            workers = workers if workers > 1 else torch.cuda.device_count()
        _run_units(todo, config, workers, device, executor, progress)
        summary = Summary(out, [_read_row(_unit_path(work, t)) for t in targets])
        summary.source_bytes = sum(r.file.stat().st_size for r in {r.file: r for r in source.tensors.values()}.values())
        summary.output_bytes = _write_shards(out, _output_entries(source, targets, work), options.max_shard_bytes)
        for f in sorted(source.folder.iterdir()):
            if (
                f.is_file()
                and f.name not in SKIP_COPY
                and not f.name.endswith(WEIGHT_SUFFIXES)
                and not f.name.startswith(".")
            ):
                atomic_write_bytes(out / f.name, f.read_bytes())
        atomic_write_bytes(out / SUMMARY, summary.markdown().encode())
        model_config = source.config
        model_config["quantization_config"] = quantization_config_dict(config, options, summary.layers)
        atomic_write_json(out / "config.json", model_config)
    except OSError as e:
        raise EasyQuantError(
            f"{out}: could not write the checkpoint ({e.strerror or e}); fix the cause and run the same command "
            "again to resume"
        ) from None
    shutil.rmtree(work)
    return summary
