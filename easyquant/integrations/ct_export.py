"""``easyquant export-ct``: an easyquant checkpoint as a compressed-tensors checkpoint.

compressed-tensors' ``pack-quantized`` format is the W4A16 layout that vLLM serves on GPUs
with its Marlin and Machete kernels (and on CPUs with its own int4 kernel) and that
transformers reads through the ``compressed-tensors`` package. Each quantized linear becomes
``weight_packed`` (int32, ``32 // bits`` codes a word from the lowest bits up, each code stored
as ``q + 2^(bits-1)``), ``weight_scale`` (fp16, one per group of columns, or per row),
``weight_shape`` and, for asymmetric weights, ``weight_zero_point`` (integer zero points,
packed the same way down the rows); the weight is ``scale * (q - zero_point)``. This is the
layout of compressed-tensors 0.17, the version vLLM 0.32 bundles; 0.20 packs widths that do not
divide 32 without padding bits and, with transformers 5.25, refuses the packed zero points of
asymmetric weights (4-bit symmetric weights, what vLLM's GPU kernels serve, are the same bytes).

easyquant's symmetric grid is the format's own (``[-2^(k-1), 2^(k-1) - 1]``, fp16 scales, the
sign in the scale), so an outlier-free weight without column scales whose groups divide its
rows is carried over bit for bit. What the format cannot hold is solved again per group
(:mod:`easyquant.integrations.regroup`) and counted: groups holding fp16 outliers, every group
of a weight with column scales, groups with fractional zero points. The model's dtype becomes
float16 (the scales' own); the folder is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.outdir import RECORD, refuse_overlap
from ..checkpoint.st_io import INDEX, Entry, _tmp, atomic_write_json, fsync_dir, write_shards
from ..errors import EasyQuantError
from .regroup import Regrouped, regroup
from .stored import StoredCheckpoint

FORMAT = "pack-quantized"
SHARD_BYTES = 2 * 2**30
SKIPPED = (".safetensors", INDEX, RECORD)  # what the export writes anew, or drops


def packed_words(n: int, bits: int) -> int:
    """int32 words holding ``n`` codes of ``bits`` bits (``32 // bits`` a word, the rest padding)."""
    return -(-n // (32 // bits))


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``(rows, n)`` -> int32 words ``(rows, packed_words(n, bits))``,
    value ``i`` of a word in bits ``i * bits`` up (compressed-tensors' ``pack_to_int32``)."""
    per = 32 // bits
    rows, n = values.shape
    padded = torch.zeros(rows, packed_words(n, bits) * per, dtype=torch.int64)
    padded[:, :n] = values
    words = (padded.view(rows, -1, per) << (torch.arange(per) * bits)).sum(-1)
    return (words - (words >> 31 << 32)).to(torch.int32)  # two's complement of the low 32 bits


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: bits, group size (None: per row), zero points."""

    bits: int
    group_size: int | None
    asymmetric: bool

    def weights(self) -> dict:
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": not self.asymmetric,
            "group_size": self.group_size,
            "strategy": "channel" if self.group_size is None else "group",
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }


@dataclass
class CtReport:
    """What the export did, for the summary line and for tests."""

    path: Path
    schemes: dict[str, Scheme] = field(default_factory=dict)  # module -> scheme
    groups: int = 0
    requantized: int = 0
    outliers: int = 0
    col_scaled: int = 0
    fractional: int = 0
    nbytes: int = 0

    def summary(self) -> str:
        share = self.requantized / self.groups if self.groups else 0.0
        kinds = sorted({f"{s.bits}-bit {'g' + str(s.group_size) if s.group_size else 'per row'}"
                        + (" asym" if s.asymmetric else "") for s in self.schemes.values()})  # fmt: skip
        notes = []
        if self.requantized:
            notes.append(
                f"re-solved {self.requantized} of {self.groups} groups ({share:.2%}): the format has no place for "
                f"{self.outliers} fp16 outliers, {self.col_scaled} weights' column scales or {self.fractional} "
                "weights' fractional zero points; quantize with --no-outliers --fold all (or --no-col-scale; "
                "and without --fractional-zero) for an exact export"
            )
        if any(s.bits != 4 for s in self.schemes.values()):
            notes.append("vLLM's int4 kernels serve 4-bit weights only; transformers reads any width")
        return (
            f"{self.path}: {len(self.schemes)} linears as compressed-tensors {FORMAT} ({', '.join(kinds)}); "
            f"{self.nbytes / 2**20:.1f} MiB" + "".join(f"\nnote: {n}" for n in notes)
        )


def _scheme(c: StoredCheckpoint, module: str, group_size: int | None) -> Scheme:
    """A module's scheme: its own bits, and its own groups cut to the largest size that divides
    both them and its columns (the format has no ragged last group; the codes carry over), or
    ``group_size`` for every module."""
    bits, own = c.qconfig.module_settings(c.quantized[module])
    cols = c.shape(module)[1]
    if group_size is not None and cols % group_size:
        raise EasyQuantError(f"{module}: {cols} input columns do not split into groups of {group_size}")
    group = group_size or math.gcd(own or cols, cols)
    return Scheme(bits, None if group == cols else group, c.qconfig.asymmetric)


def _tensors(g: Regrouped, scheme: Scheme, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    half = 1 << (scheme.bits - 1)
    codes = g.codes.reshape(shape).to(torch.int64)
    out = {
        "weight_packed": pack_int32(codes if scheme.asymmetric else codes + half, scheme.bits),
        "weight_scale": g.scales,
        "weight_shape": torch.tensor(shape, dtype=torch.int64),
    }
    if scheme.asymmetric:  # zero points stored as codes, packed down the rows
        out["weight_zero_point"] = pack_int32(g.zeros.to(torch.int64).T, scheme.bits).T.contiguous()
    return out


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict:
    """The ``quantization_config`` of the exported checkpoint: one config group per scheme
    (targeting every Linear where there is one scheme, else the modules by name)."""
    kinds = sorted(set(schemes.values()), key=lambda s: (s.bits, s.group_size or 0, s.asymmetric))
    groups = {}
    for i, s in enumerate(kinds):
        targets = ["Linear"] if len(kinds) == 1 else sorted(m for m, k in schemes.items() if k == s)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": s.weights(),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _entries(c: StoredCheckpoint, group_size: int | None, report: CtReport) -> list[Entry]:
    """Every tensor to write, in the model's order, each produced when written."""

    @lru_cache(maxsize=1)  # a module's tensors are written one after another: regroup it once
    def converted(module: str) -> dict[str, torch.Tensor]:
        qw, scheme = c.weight(module), report.schemes[module]
        g = regroup(qw, scheme.group_size or qw.shape[1], scheme.bits, scheme.asymmetric, True, module)
        report.groups += g.groups
        report.requantized += g.requantized
        report.outliers += qw.outlier_count
        report.col_scaled += qw.col_scales is not None
        report.fractional += qw.zero_shift > 0
        return _tensors(g, scheme, qw.shape)

    entries = []
    for key in c.order:
        module, suffix = key.rsplit(".", 1)
        if module in c.quantized and suffix == "weight":
            scheme = report.schemes[module] = _scheme(c, module, group_size)
            rows, cols = c.shape(module)
            ng = 1 if scheme.group_size is None else cols // scheme.group_size
            words = partial(packed_words, bits=scheme.bits)
            shapes = {"weight_packed": (rows, words(cols)), "weight_scale": (rows, ng), "weight_shape": (2,)}
            dtypes = {"weight_packed": torch.int32, "weight_scale": torch.float16, "weight_shape": torch.int64}
            if scheme.asymmetric:
                shapes["weight_zero_point"], dtypes["weight_zero_point"] = (words(rows), ng), torch.int32
            for name, shape in shapes.items():
                load = lambda m=module, n=name: converted(m)[n]  # noqa: E731
                entries.append(Entry(f"{c.quantized[module]}.{name}", dtypes[name], shape, load))
        elif key in c.stored:  # else a tied head, or a buffer the checkpoint does not hold
            ref = c.source.tensors[c.stored[key]]
            entries.append(Entry(ref.key, ref.dtype, ref.shape, ref.load))
    return entries


def export_compressed_tensors(
    ckpt: str | Path, out: str | Path, group_size: int | None = None, overwrite: bool = False, progress: bool = True
) -> CtReport:
    """Write the easyquant checkpoint folder ``ckpt`` as a compressed-tensors checkpoint folder
    ``out``; ``group_size`` regroups every linear (default: each keeps its own groups)."""
    ckpt, out = Path(ckpt), Path(out)
    refuse_overlap(ckpt, out)
    if out.exists() and not (overwrite and out.is_dir()):
        raise EasyQuantError(f"{out} exists; pass --overwrite to replace it" if out.is_dir() else f"{out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise EasyQuantError(f"{out} holds files that are not a model checkpoint; choose an empty folder")
    c = StoredCheckpoint.open(ckpt, "compressed-tensors")
    report = CtReport(out)
    entries = _entries(c, group_size, report)
    ignore = sorted(n for n, m in c.model.named_modules() if isinstance(m, nn.Linear) and n not in c.quantized)
    tmp = _tmp(out)
    tmp.mkdir()
    try:
        report.nbytes = write_shards(tmp, entries, SHARD_BYTES, progress)
        for f in ckpt.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name != "config.json" and not f.name.endswith(SKIPPED):
                shutil.copy2(f, tmp / f.name)
        config = json.loads((ckpt / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = "float16"  # the scales' dtype: a bf16 model would round them
        config["quantization_config"] = quantization_config(report.schemes, ignore)
        atomic_write_json(tmp / "config.json", config)
        fsync_dir(tmp)
        old = _tmp(out) if out.exists() else None
        if old is not None:
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
