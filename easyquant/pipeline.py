"""Whole models: a Hugging Face checkpoint in, an easyquant safetensors checkpoint out.

Two stages, both streamed (one tensor in memory per worker):

1. Each target Linear weight is read memory-mapped, quantized and written to its own file
   under ``OUT/.easyquant-work/`` (atomically). Workers run in parallel; a file already there
   is a finished unit, which is what makes an interrupted run resumable.
2. The checkpoint is assembled: shards of the quantized and untouched tensors in key order,
   the index, tokenizer files, a summary, and ``config.json`` last, so a folder without it is
   visibly unfinished. The run record then says "complete", and the work folder is removed.

``OUT/.easyquant-run.json``, written before anything else, records the run: its settings and
a fingerprint of the source. Running the same command again resumes an unfinished run and
does nothing for a complete one; a changed source or other settings are refused. The same
input and settings give a bit-identical checkpoint, whatever the worker count and however
often the run was interrupted. A run holds a lock on OUT and deletes only what it can tell
is its own (an easyquant checkpoint or run), never the source.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .allocate import plan as plan_settings
from .errors import EasyQuantError
from .quantize import QuantConfig, quantize_weight
from .source import DTYPE_OF, INDEX, Source, TensorRef, fingerprint, loader_files, open_source
from .st_io import Entry, atomic_write_bytes, atomic_write_json, fsync_dir, remove_stale_temps, write_safetensors
from .targets import Plan, Target, find_targets

# 2: asymmetric weights (a uint8 zero point per row or group beside the scales).
# 3: dual-axis weights (an fp16 scale per input column).
# 4: a bit width and group size per module (--target-bpw).
# 5: fractional zero points (uint8 in steps of 2^-(8 - bits), --fractional-zero).
# 6: compact row pointers (the narrowest type holding the outlier count; none without outliers).
COMPACT_ROWPTR = 6
FORMAT_VERSION = 6
WORK_DIR = ".easyquant-work"
PLAN = "plan.json"  # in the work folder: each module's settings under a bits budget, fixed once chosen
SUMMARY = "easyquant_summary.md"
RECORD = ".easyquant-run.json"
# Below this share of the model's weights quantized, say so: most of the model stays in full precision.
MIN_QUANTIZED_SHARE = 0.5


def format_version(config: QuantConfig, per_module: bool = False) -> int:
    """The oldest format that holds weights made with ``config``, row pointers aside (a reader
    refuses a checkpoint that claims an older one); ``per_module``: settings vary by module."""
    if config.fractional_zero:
        return 5
    return 4 if per_module else 3 if config.col_scale else 2 if config.asymmetric else 1


@dataclass(frozen=True)
class Options:
    """Everything that decides the output, beside the quantizer settings."""

    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_bytes: int = 2 * 1024**3
    target_bpw: float | None = None  # a setting per module (easyquant.allocate) within this budget


@dataclass
class Summary:
    out: Path
    layers: list[dict] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0
    left_out: list[str] = field(default_factory=list)  # source files a loader does not need
    model_weights: int = 0  # every floating-point weight of the source checkpoint

    @property
    def quantized_weights(self) -> int:
        return sum(r["rows"] * r["cols"] for r in self.layers)

    @property
    def quantized_share(self) -> float:
        return self.quantized_weights / max(self.model_weights, 1)

    @property
    def bits_per_weight(self) -> float:
        return sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in self.layers) / max(self.quantized_weights, 1)

    @property
    def outlier_fraction(self) -> float:
        return sum(r["outliers"] for r in self.layers) / max(self.quantized_weights, 1)

    def line(self) -> str:
        left_out = f"; not copied: {', '.join(self.left_out)}" if self.left_out else ""
        experts = sum(1 for r in self.layers if r.get("expert"))
        what = f"{len(self.layers) - experts} linear layers" + (f" and {experts} expert matrices" if experts else "")
        return (
            f"{what}, {self.quantized_weights / 1e6:.1f}M weights ({self.quantized_share:.0%} of the model's) at "
            f"{self.bits_per_weight:.3f} bits/weight ({self.outlier_fraction:.3%} outliers); "
            f"checkpoint {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB{left_out}"
        )

    def settings_map(self) -> str:
        """How many layers took each (bits, group size): the allocation a bits budget chose."""
        counts: dict[tuple, int] = {}
        for r in self.layers:
            key = f"{r.get('bits')}-bit " + (
                "per channel" if r.get("group_size") == r["cols"] else f"g{r.get('group_size')}"
            )
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} at {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out"}

    def markdown(self) -> str:
        rows = [
            f"| {r['module']} | {r['rows']}x{r['cols']} | {r.get('bits', '-')} | {r.get('group_size', '-')} "
            f"| {r['bits_per_weight']:.3f} | {r['outliers']} | {r['outliers'] / (r['rows'] * r['cols']):.3%} |"
            for r in self.layers
        ]
        return "\n".join(
            [
                "# easyquant summary",
                "",
                self.line(),
                "",
                "| module | shape | bits | group | bits/weight | outliers | outlier fraction |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        )


def _unit_path(work: Path, target: Target) -> Path:
    return work / "layers" / f"{target.module}.safetensors"


Unit = tuple[Target, Path, QuantConfig]
EXECUTORS = ("local", "ray")
_worker_device: str = "cpu"


def _init_worker(devices: list[str], counter, threads: int) -> None:
    global _worker_device
    with counter.get_lock():
        _worker_device = devices[counter.value % len(devices)]
        counter.value += 1
    torch.set_num_threads(threads)


def quantize_unit(target: Target, config: QuantConfig, path: Path, device: str | None = None) -> dict:
    """Quantize one weight into its unit file; returns its summary row."""
    t0 = time.perf_counter()
    source = target.source
    qw = quantize_weight(source.load().to(device or _worker_device), config, name=source.name)
    row = {
        "module": target.module,
        "rows": qw.shape[0],
        "cols": qw.shape[1],
        "outliers": qw.outlier_count,
        "bits_per_weight": qw.bits_per_weight,
        "bits": qw.bits,
        "group_size": qw.group_size,
        **({"expert": True} if target.expert else {}),
        "seconds": time.perf_counter() - t0,
    }
    tensors = qw.to("cpu").tensors()
    entries = [Entry(f"{target.module}.{k}", t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    write_safetensors(path, entries, {"row": json.dumps({k: v for k, v in row.items() if k != "seconds"})})
    return row


def _read_row(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["row"])


def _refuse_overlap(src: Path, out: Path) -> None:
    """OUT may be neither the source, nor a folder holding it, nor a folder inside it."""
    src, out = src.resolve(), out.resolve()
    if out == src or out in src.parents or (src.is_dir() and src in out.parents):
        raise EasyQuantError(
            f"output {out} overlaps the source {src} (the same path, inside it, or holding it); "
            "choose an output folder apart from the model"
        )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``out`` (created if needed): a second run on the
    same OUT is refused rather than left to clobber this one's files."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EasyQuantError(f"{out}: another easyquant run is writing this folder; wait for it to end") from None
        yield
    finally:
        os.close(fd)


def _is_easyquant_checkpoint(out: Path) -> bool:
    try:
        qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "easyquant"


def _clear(out: Path) -> None:
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    fsync_dir(out)


def _read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # damaged: ours, but matches no run
    return record if isinstance(record, dict) else {}


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> dict:
    """Make ``out`` ready for this run (the caller holds its lock) and return its record: new,
    resumed (the same settings and source, no ``overwrite``), or new after clearing the
    easyquant checkpoint or run that ``overwrite`` replaces."""
    remove_stale_temps(out)
    contents = {p.name for p in out.iterdir()}
    record = _read_record(out)
    if record is not None and (overwrite or record.get("settings") != settings):
        if not overwrite:
            previous = record.get("settings") or {}
            same_run = {k: v for k, v in previous.items() if k != "source"} == {
                k: v for k, v in settings.items() if k != "source"
            }
            why = (
                "a run of a source that has changed since (files edited or re-downloaded)"
                if same_run
                else "a checkpoint or run with other settings"
            )
            raise EasyQuantError(f"{out} holds {why}; pass --overwrite to replace it")
        _clear(out)
    elif record is None and contents and contents != {WORK_DIR}:
        if not _is_easyquant_checkpoint(out):
            raise EasyQuantError(
                f"{out} already holds files that are not an easyquant checkpoint; choose an empty folder"
                + (" (--overwrite deletes only easyquant output)" if overwrite else "")
            )
        if not overwrite:
            raise EasyQuantError(f"{out} already holds an easyquant checkpoint; pass --overwrite to replace it")
        _clear(out)
    elif record is None:  # empty, or a work folder left before the record existed
        _clear(out)
    if not (out / RECORD).is_file():
        record = {"settings": settings}
        atomic_write_json(out / RECORD, record)
    return record


def _quantize_args(args: tuple) -> dict:
    return quantize_unit(*args)


def _local_results(todo: list[Unit], workers: int, device: str) -> Iterator[dict]:
    if workers <= 1:
        for target, path, config in todo:
            yield quantize_unit(target, config, path, device)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device == "cuda" else [device]
    threads = max(1, (os.cpu_count() or 1) // workers)
    # Leaving the block terminates the workers: a failing tensor stops the run at once.
    with ctx.Pool(workers, _init_worker, (devices, ctx.Value("i", 0), threads)) as pool:
        yield from pool.imap_unordered(_quantize_args, [(target, config, path) for target, path, config in todo])


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
    pending = [task.remote(target, config, path, device) for target, path, config in todo]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:  # a failing tensor stops the run at once
        for ref in pending:
            ray.cancel(ref, force=True)


def _run_units(todo: list[Unit], workers: int, device: str, executor: str, progress: bool) -> None:
    total = sum(t.in_features * t.out_features for t, _, _ in todo)
    done_weights, t0 = 0, time.perf_counter()
    results = _ray_results(todo, device) if executor == "ray" else _local_results(todo, workers, device)
    with tqdm(total=len(todo), unit="tensor", desc="quantizing", disable=not progress or not todo) as bar:
        for row in results:
            done_weights += row["rows"] * row["cols"]
            rate = done_weights / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f} Mweights/s, {done_weights / max(total, 1):.0%} of weights")
            bar.update()


def _output_entries(source: Source, plan: Plan, work: Path) -> list[Entry]:
    """Every tensor of the checkpoint, by name: the source's (named as the model names them),
    less those quantized (a fused experts tensor, or the per-expert tensors it was read
    from), and the units' tensors."""
    consumed = {key for t in plan.targets for key in t.source.keys}
    entries = [
        Entry(plan.output_name(k), r.dtype, r.shape, r.load) for k, r in source.tensors.items() if k not in consumed
    ]
    for target in plan.targets:
        path = _unit_path(work, target)
        with safe_open(path, "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                unit = TensorRef(name, path, DTYPE_OF[sl.get_dtype()], tuple(sl.get_shape()))
                entries.append(Entry(name, unit.dtype, unit.shape, unit.load))
    return sorted(entries, key=lambda e: e.name)


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


def quantization_config_dict(
    config: QuantConfig, options: Options, targets: list[Target], layers: list[dict], per_module: bool = False
) -> dict:
    """The checkpoint's ``quantization_config``: settings, and each quantized module with its
    outlier count (an experts module: per parameter, one count per expert); ``per_module``: with
    each module's bits and group size (the row's length: per channel) too."""
    rows = {r["module"]: r for r in layers}
    outliers = {m: r["outliers"] for m, r in rows.items()}
    modules: dict[str, dict] = {}
    for t in targets:
        if t.expert is None:
            modules[t.module] = {"outliers": outliers[t.module]}
            if per_module:
                modules[t.module] |= {"bits": rows[t.module]["bits"], "group_size": rows[t.module]["group_size"]}
        else:
            experts, param, e = t.expert
            counts = modules.setdefault(experts, {"outliers": {}})["outliers"].setdefault(param, [])
            counts.extend([None] * (e + 1 - len(counts)))
            counts[e] = outliers[t.module]
            if per_module:  # one setting for the module's experts (the plan's unit)
                # Groups as wide as the widest matrix needs: a reader's min(group, columns) gives each its own.
                group = max(rows[t.module]["group_size"], modules[experts].get("group_size", 0))
                modules[experts] |= {"bits": rows[t.module]["bits"], "group_size": group}
    return {
        "quant_method": "easyquant",
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        **({"target_bpw": options.target_bpw} if per_module else {}),
        "skip": list(options.skip),
        "include": list(options.include),
        "modules": modules,
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
    ``overwrite`` replaces an easyquant checkpoint or unfinished run in ``out``; a folder holding
    anything else is never deleted.
    """
    if executor not in EXECUTORS:
        raise EasyQuantError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    config, options = config or QuantConfig(), options or Options()
    src, out = Path(src), Path(out)
    if device == "cuda" and not torch.cuda.is_available():
        raise EasyQuantError("--device cuda was asked for, but torch sees no CUDA device")
    if not src.exists():
        raise EasyQuantError(f"{src} does not exist")
    _refuse_overlap(src, out)
    settings = json.loads(
        json.dumps(
            {
                "src": str(src.resolve()),
                "source": fingerprint(src),
                "config": config.to_dict(),
                "options": asdict(options),
                "format_version": FORMAT_VERSION,
            }
        )
    )
    try:
        with _locked(out):
            record = _prepare_out(out, settings, overwrite)
            work = out / WORK_DIR
            if "summary" in record and (out / "config.json").is_file():  # complete: nothing to do
                summary = Summary(out, **record["summary"])
            else:
                (work / "layers").mkdir(parents=True, exist_ok=True)
                summary = _quantize_into(
                    out, work, src, config, options, workers, device, executor, allow_pickle, progress
                )
                atomic_write_json(out / RECORD, {"settings": settings, "summary": summary.to_dict()})
            if work.exists():
                shutil.rmtree(work)
                fsync_dir(out)
    except OSError as e:
        raise EasyQuantError(
            f"{out}: could not write the checkpoint ({e.strerror or e}); fix the cause and run the same command "
            "again to resume"
        ) from None
    return summary


def _module_configs(
    work: Path, targets: list[Target], config: QuantConfig, target_bpw: float | None, progress: bool
) -> dict[str, QuantConfig]:
    """Each target's settings: ``config``, or under a bits budget the allocation, chosen once and
    kept in the work folder so that a resumed run quantizes what it planned."""
    if target_bpw is None:
        return {t.module: config for t in targets}
    path = work / PLAN
    if not path.is_file():
        # A Linear is a unit of its own; an experts module (every expert of every parameter) is one unit.
        units = [(t.module if t.expert is None else t.expert[0], t) for t in targets]
        chosen = plan_settings([(u, t.source.load) for u, t in units], config, target_bpw, progress)
        atomic_write_json(path, {t.module: chosen[u].to_dict() for u, t in units})
    stored = json.loads(path.read_text())
    return {t.module: QuantConfig(**stored[t.module]) for t in targets}


def _quantize_into(
    out: Path,
    work: Path,
    src: Path,
    config: QuantConfig,
    options: Options,
    workers: int,
    device: str,
    executor: str,
    allow_pickle: bool,
    progress: bool,
) -> Summary:
    source = open_source(src, work / "staging", allow_pickle)
    plan = find_targets(source, options.skip, options.include)
    targets = plan.targets
    configs = _module_configs(work, targets, config, options.target_bpw, progress)
    todo = [(t, _unit_path(work, t), configs[t.module]) for t in targets if not _unit_path(work, t).is_file()]
    if device == "cuda":
        workers = workers if workers > 1 else torch.cuda.device_count()
    _run_units(todo, workers, device, executor, progress)
    summary = Summary(out, [_read_row(_unit_path(work, t)) for t in targets])
    summary.source_bytes = sum(r.file.stat().st_size for r in {r.file: r for r in source.tensors.values()}.values())
    summary.model_weights = sum(math.prod(r.shape) for r in source.tensors.values() if r.dtype.is_floating_point)
    if summary.quantized_share < MIN_QUANTIZED_SHARE:
        warnings.warn(
            f"{src}: only {summary.quantized_share:.0%} of the model's weights were quantized; the rest stay in full "
            "precision (see the summary; --include adds modules)",
            stacklevel=2,
        )
    summary.output_bytes = _write_shards(out, _output_entries(source, plan, work), options.max_shard_bytes)
    copied, left_out = loader_files(source.folder)
    summary.left_out = [f.name for f in left_out if f.name != INDEX and not f.name.endswith(".safetensors")]
    for f in copied:
        (out / f).parent.mkdir(exist_ok=True)
        atomic_write_bytes(out / f, (source.folder / f).read_bytes())
    atomic_write_bytes(out / SUMMARY, summary.markdown().encode())
    model_config = source.config
    model_config["quantization_config"] = quantization_config_dict(
        config, options, targets, summary.layers, options.target_bpw is not None
    )
    atomic_write_json(out / "config.json", model_config)
    return summary
