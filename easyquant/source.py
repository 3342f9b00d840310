"""Reading the checkpoint to quantize: a Hugging Face folder, one tensor at a time.

Accepted: safetensors (one file, or shards with ``model.safetensors.index.json``), read
memory-mapped; a GGUF file, which transformers dequantizes and which is staged once as a
safetensors folder; a pickle-only folder (``pytorch_model.bin``), refused unless the user
opts in, then read with ``torch.load(weights_only=True)`` and staged the same way.
Every file is checked up front, so a bad shard is reported before any work is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import EasyQuantError
from .st_io import DTYPE_NAMES

INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPE_OF = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorRef:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        with safe_open(self.file, "pt") as f:
            return f.get_tensor(self.key)


@dataclass(frozen=True)
class Source:
    folder: Path
    tensors: dict[str, TensorRef]

    @property
    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EasyQuantError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise EasyQuantError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any((folder / p).exists() for p in PICKLE_FILES):
            raise EasyQuantError(
                f"{folder} holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
                "pass --allow-pickle (allow_pickle=True) to read them with torch.load(weights_only=True)"
            )
        raise EasyQuantError(f"{folder} holds no safetensors weights (model.safetensors or an index of shards)")
    return files


def _read_headers(files: list[Path]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = DTYPE_OF.get(sl.get_dtype())
                    if dtype is None:
                        raise EasyQuantError(
                            f"{path}: tensor {key} has dtype {sl.get_dtype()}, which easyquant cannot read"
                        )
                    if key in tensors:
                        raise EasyQuantError(f"{path}: tensor {key} is also in {tensors[key].file.name}")
                    tensors[key] = TensorRef(key, path, dtype, tuple(sl.get_shape()))
        except SafetensorError as e:
            raise EasyQuantError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def open_safetensors_folder(folder: Path) -> Source:
    if not (folder / "config.json").is_file():
        raise EasyQuantError(f"{folder} has no config.json: not a Hugging Face model folder")
    return Source(folder, _read_headers(_shard_files(folder)))


def stage_gguf(path: Path, staging: Path) -> Path:
    """Dequantize a GGUF file through transformers into a safetensors folder (done once)."""
    if (staging / "config.json").is_file():
        return staging
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unreadable GGUF
        raise EasyQuantError(f"{path}: transformers could not read this GGUF file ({type(e).__name__}: {e})") from None
    from safetensors.torch import save_file

    tmp = staging.with_name(staging.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    state = {}
    for k, v in model.state_dict().items():  # tied weights share storage: keep the first name
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(staging)
    return staging


def stage_pickle(folder: Path, staging: Path) -> Path:
    """Convert a pickle-only folder to safetensors with ``torch.load(weights_only=True)``."""
    if (staging / "config.json").is_file():
        return staging
    import shutil

    from safetensors.torch import save_file

    tmp = staging.with_name(staging.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("*.bin", "*.bin.index.json"))
    index = folder / "pytorch_model.bin.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["pytorch_model.bin"]
    )
    for i, name in enumerate(files):
        try:
            state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise EasyQuantError(
                f"{folder / name}: cannot be read as plain weights ({type(e).__name__}: {e})"
            ) from None
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / f"pickle-{i:05d}.safetensors")
    tmp.rename(staging)
    return staging


def open_source(src: str | Path, staging: Path, allow_pickle: bool = False) -> Source:
    """The checkpoint at ``src``; GGUF and (opted-in) pickle inputs are staged under ``staging``."""
    src = Path(src)
    if not src.exists():
        raise EasyQuantError(f"{src} does not exist")
    if src.is_file():
        if src.suffix != ".gguf":
            raise EasyQuantError(f"{src}: expected a model folder or a .gguf file")
        return open_safetensors_folder(stage_gguf(src, staging / "gguf"))
    has_safetensors = any(src.glob("*.safetensors"))
    if not has_safetensors and allow_pickle and any((src / p).exists() for p in PICKLE_FILES):
        return open_safetensors_folder(stage_pickle(src, staging / "pickle"))
    return open_safetensors_folder(src)
