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

import json
import math
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.allocate import plan as plan_settings
from ..core.fold import FOLD_MODES, Fold, Folding, chosen, solve_folds
from ..core.quantize import QuantConfig
from ..errors import EasyQuantError
from ..progress import progress_bar
from .format import FORMAT_VERSION, Options, quantization_config_dict
from .outdir import RECORD, WORK_DIR, locked, prepare_out, refuse_overlap
from .source import DTYPE_OF, INDEX, Source, TensorRef, fingerprint, loader_files, open_source
from .st_io import Entry, atomic_write_bytes, atomic_write_json, fsync_dir, write_safetensors, write_shards
from .summary import Summary
from .targets import Plan, Target, find_targets
from .workers import EXECUTORS, read_row, run_units

FOLDS = "folds.safetensors"  # in the work folder: the solved folds (easyquant.core.fold)
PLAN = "plan.json"  # in the work folder: each module's settings under a bits budget, fixed once chosen
SUMMARY = "easyquant_summary.md"
# Below this share of the model's weights quantized, say so: most of the model stays in full precision.
MIN_QUANTIZED_SHARE = 0.5


def _unit_path(work: Path, target: Target) -> Path:
    return work / "layers" / f"{target.module}.safetensors"


def _output_entries(source: Source, plan: Plan, work: Path, folding: Folding) -> list[Entry]:
    """Every tensor of the checkpoint, by name: the source's (named as the model names them,
    those a fold changes as it changed them), less those quantized (a fused experts tensor, or
    the per-expert tensors it was read from), and the units' tensors."""
    consumed = {key for t in plan.targets for key in t.source.keys}
    entries = [
        Entry(plan.output_name(k), r.dtype, r.shape, (lambda t=folding.dense[k]: t) if k in folding.dense else r.load)
        for k, r in source.tensors.items()
        if k not in consumed
    ]
    for target in plan.targets:
        path = _unit_path(work, target)
        with safe_open(path, "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                unit = TensorRef(name, path, DTYPE_OF[sl.get_dtype()], tuple(sl.get_shape()))
                entries.append(Entry(name, unit.dtype, unit.shape, unit.load))
    return sorted(entries, key=lambda e: e.name)


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
    if options is not None and options.fold not in FOLD_MODES:
        raise EasyQuantError(f"fold must be one of {', '.join(FOLD_MODES)}, got {options.fold!r}")
    if executor not in EXECUTORS:
        raise EasyQuantError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    config, options = config or QuantConfig(), options or Options()
    src, out = Path(src), Path(out)
    if device == "cuda" and not torch.cuda.is_available():
        raise EasyQuantError("--device cuda was asked for, but torch sees no CUDA device")
    if not src.exists():
        raise EasyQuantError(f"{src} does not exist")
    refuse_overlap(src, out)
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
        with locked(out):
            record = prepare_out(out, settings, overwrite)
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


def _folding(work: Path, source: Source, folds: list[Fold], configs: dict[str, QuantConfig], progress: bool) -> Folding:
    """``folds`` of the model's column scales (those whose readers have column scales), solved
    once and kept in the work folder, so that a resumed run quantizes with the same scales."""
    path = work / FOLDS
    if not path.is_file():
        folds = [f for f in folds if all(configs[r].col_scale for r in f.readers)]
        with progress_bar(total=len(folds), unit="fold", desc="folding", disable=not progress or not folds) as bar:
            folding = solve_folds(folds, lambda key: source.tensors[key].load(), configs, bar.update)
        entries = [(f"{kind}:{m}", t) for m, pair in folding.scales.items() for kind, t in zip("rc", pair, strict=True)]
        entries = [(k, t) for k, t in entries if t is not None]
        entries += [(f"d:{k}", t) for k, t in folding.dense.items()]
        write_safetensors(path, [Entry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in entries])
    folding = Folding()
    with safe_open(path, "pt") as f:
        for key in f.keys():
            kind, name = key.split(":", 1)
            if kind == "d":
                folding.dense[name] = f.get_tensor(key)
            else:
                rows, cols = folding.of(name)
                t = f.get_tensor(key)
                folding.scales[name] = (t, cols) if kind == "r" else (rows, t)
    return folding


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
    # Under a bits budget the plan was scored on unfolded weights, and folding would move its outlier counts.
    fold = options.fold if options.target_bpw is None else "none"
    folding = _folding(work, source, chosen(plan.folds, fold), configs, progress)
    todo = [
        (t, _unit_path(work, t), configs[t.module], folding.of(t.module))
        for t in targets
        if not _unit_path(work, t).is_file()
    ]
    if device == "cuda":
        workers = workers if workers > 1 else torch.cuda.device_count()
    run_units(todo, workers, device, executor, progress)
    summary = Summary(out, [read_row(_unit_path(work, t)) for t in targets])
    summary.source_bytes = sum(r.file.stat().st_size for r in {r.file: r for r in source.tensors.values()}.values())
    summary.model_weights = sum(math.prod(r.shape) for r in source.tensors.values() if r.dtype.is_floating_point)
    if summary.quantized_share < MIN_QUANTIZED_SHARE:
        warnings.warn(
            f"{src}: only {summary.quantized_share:.0%} of the model's weights were quantized; the rest stay in full "
            "precision (see the summary; --include adds modules)",
            stacklevel=2,
        )
    entries = _output_entries(source, plan, work, folding)
    summary.output_bytes = write_shards(out, entries, options.max_shard_bytes, progress)
    copied, left_out = loader_files(source.folder)
    summary.left_out = [f.name for f in left_out if f.name != INDEX and not f.name.endswith(".safetensors")]
    for f in copied:
        (out / f).parent.mkdir(exist_ok=True)
        atomic_write_bytes(out / f, (source.folder / f).read_bytes())
    atomic_write_bytes(out / SUMMARY, summary.markdown().encode())
    model_config = source.config
    folds = [f for f in plan.folds if all(folding.of(r)[1] is not None for r in f.readers)]  # the ones made
    model_config["quantization_config"] = quantization_config_dict(
        config, options, targets, summary.layers, options.target_bpw is not None, folds
    )
    atomic_write_json(out / "config.json", model_config)
    return summary
