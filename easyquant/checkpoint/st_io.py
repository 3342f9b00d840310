"""Streaming safetensors output and atomic file writes.

The safetensors writer takes each tensor from a callable as it writes, so a shard of any
size is written holding one tensor in memory at a time. Every file is written under a
temporary name unique to the writing process, flushed to disk, renamed into place, and the
rename itself made durable (the folder is synced), so neither a reader nor a crash ever sees
half a file, and two writers never share a temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import progress_bar

INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[_name]


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype and shape up front, its data on demand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


TMP_SUFFIX = ".eqtmp"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files a killed writer left under ``folder`` (call only while no
    other writer can be at work there: :func:`easyquant.checkpoint.pipeline.quantize_model` holds a lock)."""
    for f in folder.rglob(f".*{TMP_SUFFIX}"):
        f.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` (in the order given) as one safetensors file, atomically."""
    entries = list(entries)
    header: dict[str, object] = {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in entries:
                t = e.load().detach().to("cpu", e.dtype).contiguous()
                if tuple(t.shape) != e.shape:
                    raise ValueError(f"{e.name}: expected shape {e.shape}, got {tuple(t.shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(out: Path, entries: list[Entry], max_bytes: int, progress: bool = True) -> int:
    """``entries`` as safetensors shards of at most ``max_bytes`` each (a larger tensor gets a shard of
    its own) in ``out``, named as transformers names them, with the index when there are several;
    returns the bytes written."""
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
    bar = progress_bar(shards, desc="writing shards", unit="shard", disable=not progress or n == 1)
    for name, shard in zip(names, bar, strict=True):
        write_safetensors(out / name, shard, {"format": "pt"})
    if n > 1:
        weight_map = {e.name: name for name, shard in zip(names, shards, strict=True) for e in shard}
        atomic_write_json(
            out / INDEX, {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        )
    return sum((out / name).stat().st_size for name in names)


ITEM_SIZES = {name: torch.empty((), dtype=dtype).element_size() for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The ``{name: (dtype, shape)}`` of a safetensors file, checked before anything reads its
    data: the header parses, every dtype is known, every tensor's byte range matches its shape
    and dtype, and the ranges tile the data exactly. Raises :class:`EasyQuantError` naming the
    file (and tensor) otherwise."""
    from ..errors import EasyQuantError

    def bad(why: str) -> EasyQuantError:
        return EasyQuantError(f"{path}: corrupt or unreadable safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise bad("shorter than its 8-byte header length")
        n = struct.unpack("<Q", f.read(8))[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} exceeds the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"header is not JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    out, ranges = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must hold dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEM_SIZES:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        ints = (list, tuple)
        if not isinstance(shape, ints) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, ints) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r} is not two integers")
        nbytes = ITEM_SIZES[dtype]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} in {dtype}")
        ranges.append((offsets[0], offsets[1], name))
        out[name] = (dtype, tuple(shape))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            raise bad(f"tensor {name!r}: data at byte {start}, expected {end} (overlap or gap)")
        end = stop
    if end != size - 8 - n:
        raise bad(f"data is {size - 8 - n} bytes, the tensors cover {end}")
    return out
