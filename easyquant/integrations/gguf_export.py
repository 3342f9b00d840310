"""``easyquant export-gguf``: an easyquant checkpoint as a GGUF file that llama.cpp runs.

The checkpoint is validated exactly as loading it is (config keys, every safetensors header
against the model built on the meta device, CSR bounds), then streamed one tensor at a time
into the file: the quantized linears as llama.cpp blocks (:mod:`easyquant.integrations.ggml_blocks`:
easyquant's codes and scales carried over bit for bit, blocks holding outliers re-quantized),
everything else as F16 (1-D tensors F32, as llama.cpp's converter writes them). Hyperparameters
and tensor names follow llama.cpp's converter for the architectures listed in ``ARCHS``
(llama's rotary row order for q/k, Gemma's ``1 + weight`` norms). The tokenizer comes from the
checkpoint's ``tokenizer.json`` (byte-level BPE), or is copied from a GGUF of the same model
(``tokenizer_from``): a tokenizer that transformers rebuilt from a GGUF has lost llama.cpp's
pre-tokenizer name, and SentencePiece vocabularies need their scores. The file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checkpoint.outdir import RECORD
from ..checkpoint.source import TensorRef
from ..checkpoint.st_io import _replace, _tmp
from ..errors import EasyQuantError
from ..progress import progress_bar
from .ggml_blocks import BLOCK, Q4_0, Q4_1, Q8_0, BlockType, block_type_for, to_blocks
from .stored import StoredCheckpoint

# transformers model_type -> llama.cpp architecture (Mistral runs as llama in llama.cpp).
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2"}
ROTARY_ROW_ORDER = ("llama",)  # llama.cpp's llama rope pairs rows differently: q/k rows are permuted
ONE_PLUS_NORMS = ("gemma", "gemma2")  # norms stored as 1 + weight
QTYPES = {kind: gguf.GGMLQuantizationType[kind.name] for kind in (Q4_0, Q4_1, Q8_0)}
FILE_TYPES = {kind.name: gguf.LlamaFileType[f"MOSTLY_{kind.name}"] for kind in QTYPES}
DENSE_TYPES = ("f16", "f32", "q8_0")
# llama.cpp's pre-tokenizer names, by the split regex of the tokenizer.json they come from.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass
class ExportReport:
    """What the export did, for the summary line and for tests."""

    path: Path
    arch: str
    tensors: int = 0
    quantized: dict[str, str] = field(default_factory=dict)  # GGUF name -> block type
    blocks: int = 0
    requantized: int = 0
    dense: dict[str, str] = field(default_factory=dict)  # GGUF name -> type
    nbytes: int = 0
    tokenizer: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        share = self.requantized / self.blocks if self.blocks else 0.0
        kinds = sorted(set(self.quantized.values()))
        return (
            f"{self.path}: {self.arch}, {self.tensors} tensors ({len(self.quantized)} quantized as "
            f"{'/'.join(kinds) or '-'}, {len(self.dense)} dense); {self.requantized} of {self.blocks} blocks "
            f"({share:.2%}) held outliers or straddled groups and were re-quantized; tokenizer {self.tokenizer}; "
            f"{self.nbytes / 2**20:.1f} MiB" + "".join(f"\nnote: {n}" for n in self.notes)
        )


# -- hyperparameters ---------------------------------------------------------------------------


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise EasyQuantError(f"rope scaling {kind!r}: the GGUF export handles only unscaled rope so far")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def write_hparams(w: gguf.GGUFWriter, cfg, arch: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads or arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping or 0.0)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping or 0.0)
        w.add_sliding_window(cfg.sliding_window)


# -- tokenizer ---------------------------------------------------------------------------------


def _pre_nodes(tok: dict) -> list[dict]:
    node = tok.get("pre_tokenizer") or {}
    return node.get("pretokenizers", [node]) if node.get("type") == "Sequence" else [node]


def _pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer."""
    nodes = _pre_nodes(tok)
    kinds = [n.get("type") for n in nodes]
    for n in nodes:
        if n.get("type") == "Split" and (regex := n.get("pattern", {}).get("Regex")) in PRE_BY_SPLIT:
            return PRE_BY_SPLIT[regex]
    if kinds == ["Digits", "ByteLevel"] and nodes[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and nodes[0].get("use_regex", True):
        return "gpt-2"
    raise EasyQuantError(
        f"tokenizer.json: a pre-tokenizer whose llama.cpp name is unknown here ({json.dumps(nodes)[:200]}); "
        "pass --tokenizer-from a GGUF of the same model"
    )


def write_bpe_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Tokens, types, merges and special ids of a byte-level BPE ``tokenizer.json``
    (Llama 3, Qwen2, SmolLM, GPT-2 style); returns the pre-tokenizer name."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EasyQuantError(f"{folder} has no tokenizer.json; pass --tokenizer-from a GGUF of the same model")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tok.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise EasyQuantError(
            f"{path}: not a byte-level BPE tokenizer (SentencePiece-style vocabularies need their scores); "
            "pass --tokenizer-from a GGUF of the same model"
        )
    pre = _pre_tokenizer(tok)
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_add_space_prefix(any(n.get("add_prefix_space") for n in _pre_nodes(tok)))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    single = (tok.get("post_processor") or {}).get("single") or [{}]
    special.add_special_token.setdefault("bos", "SpecialToken" in single[0])  # llama.cpp's default differs
    special.add_to_gguf(w, quiet=True)
    return f"from tokenizer.json (gpt2, pre {pre})"


def copy_tokenizer(w: gguf.GGUFWriter, source: Path, vocab_size: int) -> str:
    """Every ``tokenizer.*`` key of another GGUF (llama.cpp's own conversion of the same model)."""
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as e:
        raise EasyQuantError(f"{source}: not a readable GGUF file ({e})") from None
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        have = "none" if tokens is None else len(tokens.data)
        raise EasyQuantError(f"{source}: holds {have} tokens, the model's vocabulary has {vocab_size}")
    for key, f in fields.items():
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    return f"copied from {source.name}"


# -- tensors -----------------------------------------------------------------------------------


def rotary_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a llama q/k projection (its converter's permutation)."""
    rows = a.shape[0]
    return a.reshape(heads, 2, rows // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


@dataclass(frozen=True)
class Layout:
    """Where a transformers tensor goes in llama.cpp's file: its name and its row order."""

    arch: str
    names: gguf.TensorNameMap
    heads: dict[str, int]

    @classmethod
    def of(cls, cfg) -> Layout:
        arch = ARCHS.get(cfg.model_type)
        if arch is None:
            raise EasyQuantError(f"model type {cfg.model_type!r}: the GGUF export knows {', '.join(sorted(ARCHS))}")
        arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(arch, gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers), {"attn_q": heads, "attn_k": kv})

    def name(self, hf: str) -> str:
        name = self.names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EasyQuantError(f"tensor {hf} has no llama.cpp name in the {self.arch} architecture")
        return name

    def reorder(self, name: str, a: np.ndarray) -> np.ndarray:
        part = name.split(".")[2] if name.startswith("blk.") else ""
        return rotary_rows(a, self.heads[part]) if self.arch in ROTARY_ROW_ORDER and part in self.heads else a


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, numpy shape and dtype as written, and a function producing it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    qtype: gguf.GGMLQuantizationType | None
    make: Callable[[], np.ndarray]


def _dense_type(ref: TensorRef, kind: str, load: Callable[[], torch.Tensor]) -> gguf.GGMLQuantizationType:
    """The GGUF type of a tensor easyquant left in full precision (1-D: F32, as llama.cpp wants).
    Only an F16 target from a wider dtype needs the data (``load``): values past fp16's range stay F32."""
    if len(ref.shape) == 1 or kind == "f32":
        return gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and ref.shape[-1] % BLOCK == 0:
        return gguf.GGMLQuantizationType.Q8_0
    if ref.dtype != torch.float16 and load().abs().max() > torch.finfo(torch.float16).max:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16


def _encode_dense(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(t.float().numpy(), qtype)
    return t.to(torch.float32 if qtype == gguf.GGMLQuantizationType.F32 else torch.float16).numpy()


def plan_tensors(ckpt: Path, dense: str, kind: BlockType | None, report: ExportReport) -> tuple[object, list[Planned]]:
    """The transformers config and every GGUF tensor to write, in the model's order."""
    c = StoredCheckpoint.open(ckpt, "GGUF")
    layout = Layout.of(c.cfg)
    report.arch = layout.arch

    def blocks(module: str, name: str, bk: BlockType) -> np.ndarray:
        b = to_blocks(c.weight(module), bk)
        report.blocks += b.blocks
        report.requantized += b.requantized
        return layout.reorder(name, b.data)

    def load_dense(key: str, name: str) -> torch.Tensor:
        t = c.dense(key)
        return t.float() + 1 if layout.arch in ONE_PLUS_NORMS and name.endswith("norm.weight") else t

    def dense_tensor(key: str, name: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        return layout.reorder(name, _encode_dense(load_dense(key, name), qtype))

    plan: list[Planned] = []
    for key in c.order:
        module, suffix = key.rsplit(".", 1)
        if not (module in c.quantized and suffix == "weight") and key not in c.stored:
            continue  # a tied head, or a buffer the checkpoint does not hold
        name = layout.name(key)
        if module in c.quantized and suffix == "weight":
            rows, cols = c.shape(module)
            if cols % BLOCK:
                raise EasyQuantError(f"{key}: {cols} input columns; llama.cpp blocks need a multiple of {BLOCK}")
            bk = kind or block_type_for(c.qconfig.module_settings(c.quantized[module])[0], c.qconfig.asymmetric)
            report.quantized[name] = bk.name
            row_bytes = cols // BLOCK * bk.block_bytes
            make = partial(blocks, module, name, bk)
            plan.append(Planned(name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, QTYPES[bk], make))
        else:
            ref = c.source.tensors[c.stored[key]]
            qtype = _dense_type(ref, dense, partial(load_dense, key, name))
            report.dense[name] = qtype.name
            probe = _encode_dense(torch.zeros(ref.shape), qtype)
            q = qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None
            plan.append(
                Planned(name, probe.shape, probe.dtype, probe.nbytes, q, partial(dense_tensor, key, name, qtype))
            )
    return c.cfg, plan


def export_gguf(
    ckpt: str | Path,
    out: str | Path,
    tokenizer_from: str | Path | None = None,
    dense: str = "f16",
    kind: BlockType | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write the easyquant checkpoint folder ``ckpt`` as the GGUF file ``out``; ``kind`` forces
    the block type of the quantized linears (default: the smallest that holds their codes)."""
    ckpt, out = Path(ckpt), Path(out)
    if dense not in DENSE_TYPES:
        raise EasyQuantError(f"dense type must be one of {DENSE_TYPES}, got {dense!r}")
    if out.is_dir() or (out.exists() and not overwrite):
        raise EasyQuantError(f"{out} exists; pass --overwrite to replace it" if out.is_file() else f"{out} is a folder")
    report = ExportReport(out, "")
    cfg, plan = plan_tensors(ckpt, dense, kind, report)
    report.notes += _tokenizer_hint(ckpt) if tokenizer_from is None else []
    tmp = _tmp(out)
    writer = gguf.GGUFWriter(None, report.arch)
    try:
        writer.add_name(ckpt.resolve().name)
        writer.add_quantized_by("easyquant")
        kinds = set(report.quantized.values())
        writer.add_file_type(FILE_TYPES[kinds.pop() if len(kinds) == 1 else Q8_0.name])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, cfg, report.arch)
        report.tokenizer = (
            copy_tokenizer(writer, Path(tokenizer_from), cfg.vocab_size)
            if tokenizer_from
            else write_bpe_tokenizer(writer, ckpt, cfg.vocab_size)
        )
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, p.dtype, p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in progress_bar(plan, desc="export-gguf", unit="tensor", disable=not progress):
            a = p.make()
            if a.shape != p.shape or a.dtype != p.dtype:
                raise EasyQuantError(f"{p.name}: produced {a.dtype} {a.shape}, planned {p.dtype} {p.shape}")
            writer.write_tensor_data(a)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        _replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    report.tensors = len(plan)
    report.nbytes = out.stat().st_size
    if report.requantized:
        report.notes.append(
            "blocks holding fp16 outliers or under column scales cannot be stored exactly in GGUF; for an exact "
            "export quantize with --group-size 32 --no-outliers --fold all (or --no-col-scale; any group size that "
            "is a multiple of 32 keeps the other blocks exact)"
        )
    return report


def _tokenizer_hint(ckpt: Path) -> list[str]:
    """A checkpoint quantized from a GGUF: point at that file's tokenizer (llama.cpp's own)."""
    try:
        src = json.loads((ckpt / RECORD).read_text())["settings"]["src"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if isinstance(src, str) and src.endswith(".gguf") and Path(src).is_file():
        return [f"quantized from {src}: --tokenizer-from {src} keeps llama.cpp's own tokenizer settings"]
    return []
