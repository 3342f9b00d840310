"""Reading the checkpoint to quantize: a Hugging Face folder, one tensor at a time.

Accepted: safetensors (one file, or shards with ``model.safetensors.index.json``), read
memory-mapped; a GGUF file, which transformers dequantizes and which is staged once as a
safetensors folder; a pickle-only folder (``pytorch_model.bin``), refused unless the user
opts in, then read with ``torch.load(weights_only=True)`` and staged the same way.
Every file is checked up front, so a bad shard is reported before any work is done; an
index may name only files inside its own folder.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import EasyQuantError
from .st_io import DTYPE_NAMES, INDEX

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = ("pytorch_model.bin", PICKLE_INDEX)
# What a loader reads beside the weights and config.json: tokenizer, generation settings, chat
# template, processor, sentence-transformers' module list, the model card. Everything else
# (other weight formats: tf_model.h5, flax_model.msgpack, *.onnx, *.pt) stays behind.
LOADER_FILES = (
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
    "LICENSE*",
)
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

    @property
    def name(self) -> str:
        return self.key

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``expert`` of a fused 3-D experts tensor ``(experts, out, in)`` (``(experts, in,
    out)`` when ``transposed``), read alone: only that expert's bytes leave the file."""

    ref: TensorRef
    expert: int
    transposed: bool = False

    def load(self) -> torch.Tensor:
        with safe_open(self.ref.file, "pt") as f:
            w = f.get_slice(self.ref.key)[self.expert]
        return w.T.contiguous() if self.transposed else w

    @property
    def name(self) -> str:
        return f"{self.ref.key}[{self.expert}]"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.ref.key,)


@dataclass(frozen=True)
class Stacked:
    """One expert's fused matrix from its per-expert tensors on disk, stacked by rows (gate
    above up, as transformers fuses them into ``gate_up_proj``)."""

    parts: tuple[TensorRef, ...]

    def load(self) -> torch.Tensor:
        return torch.cat([p.load() for p in self.parts])

    @property
    def name(self) -> str:
        return " + ".join(p.key for p in self.parts)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.parts)


WeightSource = TensorRef | ExpertSlice | Stacked


@dataclass(frozen=True)
class Source:
    folder: Path
    tensors: dict[str, TensorRef]

    @property
    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())


def _module_configs(folder: Path) -> list[Path]:
    """The JSON configs of the sentence-transformers modules ``modules.json`` lists
    (``1_Pooling/config.json``), relative to ``folder``: a module folder inside it only."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    subdirs = [
        Path(p) for p in paths if isinstance(p, str) and p and not Path(p).is_absolute() and ".." not in Path(p).parts
    ]
    return sorted(f.relative_to(folder) for d in subdirs if (folder / d).is_dir() for f in (folder / d).glob("*.json"))


def loader_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files a loader needs beside weights and config.json, relative to ``folder`` (a
    sentence-transformers model's module configs included), and the top-level ones left out."""
    files = sorted(Path(f.name) for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    keep = [f for f in files if any(fnmatch.fnmatchcase(f.name, p) for p in LOADER_FILES)]
    return keep + _module_configs(folder), [f for f in files if f not in keep and f.name != "config.json"]


def fingerprint(src: Path) -> list[list]:
    """Name, size and modification time of every file a run reads: a resumed run must see the
    same source (an edited or re-downloaded file would otherwise mix with stale parts)."""
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.is_file() and not f.name.startswith("."))
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def index_shards(index: Path) -> list[str]:
    """The shard file names an index's ``weight_map`` names, each checked to be a plain file
    name in the index's own folder (an absolute path or ``..`` would read files elsewhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise EasyQuantError(f"{index}: not a valid index of shards ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise EasyQuantError(f"{index}: weight_map must map tensor names to shard files")
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise EasyQuantError(
                f"{index}: tensor {key!r} maps to {name!r}, which is not a file name in {index.parent}"
            )
    return sorted(set(weight_map.values()))


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        files = index_shards(index)
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


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor's aliases dropped (tied weights are one tensor under two names;
    the first name stays, as transformers' own save does) and other storage-sharing views
    copied, so that safetensors can write it."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for k, v in state.items():
        view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if view in seen:
            continue
        seen[view] = k
        storage = v.untyped_storage().data_ptr()
        out[k] = v.clone() if storage in storages or not v.is_contiguous() else v
        storages.add(storage)
    return out


def _stage(staging: Path, states: Iterable[dict[str, torch.Tensor]], write_rest) -> Path:
    """Write ``states`` as safetensors files plus ``write_rest(folder)`` (config, tokenizer) into
    ``staging``, through a temporary folder renamed into place once complete (done once)."""
    if (staging / "config.json").is_file():
        return staging
    from safetensors.torch import save_file

    tmp = staging.with_name(staging.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, state in enumerate(states):
        save_file(_unaliased(state), tmp / f"staged-{i:05d}.safetensors", metadata={"format": "pt"})
    write_rest(tmp)
    tmp.rename(staging)
    return staging


def stage_gguf(path: Path, staging: Path) -> Path:
    """Dequantize a GGUF file through transformers into a safetensors folder."""
    if (staging / "config.json").is_file():
        return staging
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unreadable GGUF
        raise EasyQuantError(f"{path}: transformers could not read this GGUF file ({type(e).__name__}: {e})") from None

    def write_rest(folder: Path) -> None:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(folder)
        tok.save_pretrained(folder)

    return _stage(staging, [model.state_dict()], write_rest)


def stage_pickle(folder: Path, staging: Path) -> Path:
    """Convert a pickle-only folder to safetensors with ``torch.load(weights_only=True)``."""
    index = folder / PICKLE_INDEX
    files = index_shards(index) if index.exists() else ["pytorch_model.bin"]

    if not (folder / "config.json").is_file():
        raise EasyQuantError(f"{folder} has no config.json: not a Hugging Face model folder")

    def states() -> Iterable[dict[str, torch.Tensor]]:
        for name in files:
            try:
                state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise EasyQuantError(
                    f"{folder / name}: cannot be read as plain weights ({type(e).__name__}: {e})"
                ) from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise EasyQuantError(f"{folder / name}: holds no state dict (a mapping of names to tensors)")
            yield state

    def write_rest(tmp: Path) -> None:
        for f in [Path("config.json"), *loader_files(folder)[0]]:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / f, tmp / f)

    return _stage(staging, states(), write_rest)


UNQUANTIZED = ("F32", "F16", "BF16", "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16")


def source_note(path: Path) -> str:
    """What a reader of a table must know about the weights at ``path``: a GGUF file's own
    format (``general.file_type``, else its commonest tensor type), and whether its weights were
    quantized once already. Empty for other sources."""
    if path.suffix != ".gguf":
        return ""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    else:
        from collections import Counter

        kind = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2).most_common(1)[0][0]
    if kind in UNQUANTIZED:
        return f" (weights from GGUF {kind})"
    return f" (weights from GGUF {kind}: quantized once already)"


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
