"""GGUF export: llama.cpp's blocks carry easyquant's codes and scales exactly; exported files
load in transformers' GGUF reader (llama.cpp's format, dequantized by the ``gguf`` package)
with the checkpoint's logits; the SmolLM2 export has the metadata llama.cpp's own converter
wrote; bad input is refused by name and leaves no file."""

from __future__ import annotations

import copy
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import easyquant  # noqa: F401  (registers the transformers loader)
from conftest import CONFIGS, tiny_model
from easyquant import QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.errors import EasyQuantError
from easyquant.eval.assets import smollm2_gguf
from easyquant.integrations.ggml_blocks import (
    Q4_0,
    Q4_1,
    Q8_0,
    pack_blocks,
    reconstruct,
    to_blocks,
    unpack_blocks,
)
from easyquant.integrations.gguf_export import export_gguf
from easyquant.integrations.regroup import best_groups, group_weights

EXACT = QuantConfig(group_size=32, n_sigma=None, col_scale=False)
PLAIN = QuantConfig(n_sigma=2.0, col_scale=False)  # GGUF holds no column scales; outliers in every layer


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4, 5, 8]), st.sampled_from([None, 32, 64, 48]),
       st.sampled_from([None, 2.5]), st.booleans())  # fmt: skip
def test_blocks_are_llama_cpp_blocks_of_the_same_weight(seed, bits, group, n_sigma, asym) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 96, generator=g) * 0.02 + (0.01 if asym else 0)
    qw = quantize_weight(w, QuantConfig(bits=bits, group_size=group, n_sigma=n_sigma, asymmetric=asym, col_scale=False))
    b = to_blocks(qw)
    assert b.kind is ((Q4_1 if asym else Q4_0) if bits <= 4 else Q8_0)
    llama_cpp = gguf.quants.dequantize(b.data, gguf.GGMLQuantizationType[b.kind.name])
    ours = reconstruct(b.data, b.kind, qw.shape)
    assert np.array_equal(llama_cpp, ours.numpy())
    dense = qw.dequantize(torch.float32).view(8, 3, 32)
    touched = torch.zeros(8, 3, dtype=torch.bool)
    touched[qw.outlier_rows(), qw.outlier_cols.long() // 32] = True
    if (group is not None and group % 32) or (asym and bits > 4):  # no block type holds these blocks exactly
        touched[:] = True
    assert b.requantized == int(touched.sum())
    # every block without an outlier (inside one scale group) is carried over bit for bit; an
    # asymmetric one's zero point becomes Q4_1's fp16 minimum -s * z, rounded
    carried, want = ours.view(8, 3, 32)[~touched], dense[~touched]
    if asym:
        m = (qw.scales.float() * qw.zeros.float()).abs().max().item()
        torch.testing.assert_close(carried, want, rtol=0, atol=m * 2**-11 + 1e-9)
    else:
        assert torch.equal(carried, want)
    # as Q8_0 (--type q8_0) the re-solved blocks, outliers included, stay within a step of 255 levels
    q8 = reconstruct(to_blocks(qw, Q8_0).data, Q8_0, qw.shape).view(8, 3, 32)
    if not asym:  # Q8_0 has no zero: an asymmetric weight's blocks are all re-solved
        assert torch.equal(q8[~touched], dense[~touched])
    step = dense.abs().amax(-1, keepdim=True) / 127
    assert ((q8 - dense).abs() <= step).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_pack_unpack_round_trip_and_best_blocks_beat_both_candidates(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    for kind in (Q4_0, Q4_1, Q8_0):
        codes = torch.randint(kind.qmin, kind.qmax + 1, (5, 32), generator=g, dtype=torch.int8)
        d = (torch.randn(5, generator=g) * 0.01).half()
        m = (torch.randn(5, generator=g) * 0.01).half() if kind.affine else None
        back_codes, back_d, back_m = unpack_blocks(pack_blocks(codes, d, kind, m), kind)
        assert torch.equal(back_codes, codes) and torch.equal(back_d, d)
        assert (back_m is None) == (m is None) and (m is None or torch.equal(back_m, m))
    x = torch.randn(64, 32, generator=g) * 0.02
    x[torch.arange(64), torch.randint(0, 32, (64,), generator=g)] *= 6  # one outlier per block

    def cost(w: torch.Tensor) -> torch.Tensor:  # the default objective, p = 3
        return ((w - x).abs() ** 3).sum(1)

    for affine in (False, True):
        d = (x.abs().amax(1) / 40).half()
        z = torch.full((64,), 8.0) if affine else None
        ours = group_weights(best_groups(x, 4, affine, (torch.zeros(64, 32, dtype=torch.int16), d, z)))
        solved = group_weights(best_groups(x, 4, affine))  # the solver's own group
        lo, hi = (0, 15) if affine else (-8, 7)
        kept = ((x / d.float()[:, None] + (0 if z is None else z[:, None])).round().clamp(lo, hi)
                - (0 if z is None else z[:, None])) * d.float()[:, None]  # fmt: skip
        assert (cost(ours) <= cost(solved) * (1 + 1e-5)).all()
        assert (cost(ours) <= cost(kept) * (1 + 1e-5)).all()


VOCAB = 256  # the tiny models' vocabulary: SmolLM2's first tokens


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's byte-level BPE tokenizer (from the offline GGUF), saved as transformers saves it,
    cut to its first ``VOCAB`` tokens and the merges among them: the same kind of tokenizer, in
    files (and GGUF metadata) that read in milliseconds rather than seconds."""
    folder = tmp_path_factory.mktemp("tok")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf().parent, gguf_file=smollm2_gguf().name)
    tok.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < VOCAB}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    model["merges"] = [p for p in pairs if all(t in model["vocab"] for t in (*p, "".join(p)))]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < VOCAB]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_key_value_heads": 2,
         "max_position_embeddings": 64}  # fmt: skip
MORE = {  # transformers reads Qwen3's head_dim from a GGUF only at its default, 128
    "qwen3": transformers.Qwen3Config(**SMALL, num_attention_heads=2, head_dim=128),
    "gemma2": transformers.Gemma2Config(**SMALL, num_attention_heads=4, head_dim=16),
}


def _tiny_checkpoint(kind: str, tmp_path, tokenizer_dir, config: QuantConfig = EXACT, options: Options | None = None):
    cfg = copy.deepcopy(MORE.get(kind) or CONFIGS[kind])
    cfg.vocab_size, cfg.tie_word_embeddings = VOCAB, kind != "llama"  # the tokenizer's vocabulary
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", config, options, progress=False)
    return tmp_path / "q"


@torch.inference_mode()
def _logits(path, **kw) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model(torch.tensor([[1, 5, 90, 42, 7, 200, 11]])).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "gemma2"])
def test_exported_file_loads_with_the_checkpoint_logits(tmp_path, tokenizer_dir, kind) -> None:
    ckpt = _tiny_checkpoint(kind, tmp_path, tokenizer_dir)
    report = export_gguf(ckpt, tmp_path / "m.gguf", dense="f32", progress=False)
    assert report.requantized == 0 and set(report.quantized.values()) == {"Q4_0"}
    assert report.arch == {"mistral": "llama"}.get(kind, kind)
    got = _logits(tmp_path, gguf_file="m.gguf")
    torch.testing.assert_close(got, _logits(ckpt), atol=2e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*eqtmp"))


@pytest.mark.parametrize("fractional", [False, True])
def test_asymmetric_checkpoint_exports_as_q4_1(tmp_path, tokenizer_dir, fractional) -> None:
    """Codes and scales carry over; each zero point, whole or fractional, becomes Q4_1's fp16
    minimum (the blocks' bound is the property test's), so the logits move by that rounding only."""
    config = QuantConfig(group_size=32, n_sigma=None, asymmetric=True, fractional_zero=fractional, col_scale=False)
    ckpt = _tiny_checkpoint("llama", tmp_path, tokenizer_dir, config)
    report = export_gguf(ckpt, tmp_path / "m.gguf", dense="f32", progress=False)
    assert report.requantized == 0 and set(report.quantized.values()) == {"Q4_1"}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    got, want = _logits(tmp_path, gguf_file="m.gguf"), _logits(ckpt)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert (got - want).abs().mean() < 3e-4


@pytest.mark.parametrize("fold", ["all", "rows"])
def test_the_default_checkpoint_exports(tmp_path, tokenizer_dir, fold) -> None:
    """The default (column scales, outliers) exports. Folded whole (``--fold all``), its codes
    carry over and only the blocks holding outliers are solved again; the default folds only
    o_proj's and down_proj's, and GGUF has no place for the other column scales, so the
    blocks of q/k/v and gate/up are solved again from the checkpoint's weights. Either way each
    matrix is within its 4-bit rounding of the checkpoint's, and the file loads with logits
    about as near the source model's as the checkpoint's own."""
    ckpt = _tiny_checkpoint("llama", tmp_path, tokenizer_dir, QuantConfig(group_size=32), Options(fold=fold))
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["col_scale"] is True and len(qc["folds"]) == (8 if fold == "all" else 4)
    report = export_gguf(ckpt, tmp_path / "m.gguf", dense="f32", progress=False)
    assert set(report.quantized.values()) == {"Q4_0"} and report.blocks > 0
    outliers = sum(m["outliers"] for m in qc["modules"].values())
    plain = sum(64 * 64 // 32 + 96 * 64 // 32 for _ in range(2))  # o_proj and down_proj, 2 layers: 32-weight blocks
    assert 0 < report.requantized <= outliers + (0 if fold == "all" else report.blocks - plain)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    w = model.model.layers[0].mlp.down_proj.quantized_weight().dequantize(torch.float32)
    (t,) = [t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ffn_down.weight"]
    exported = reconstruct(np.asarray(t.data), Q4_0, tuple(w.shape))
    assert ((exported - w).norm() / w.norm()).item() < 0.1
    source = _logits(tmp_path / "src")
    assert (_logits(tmp_path, gguf_file="m.gguf") - source).norm() < 2 * (_logits(ckpt) - source).norm()


def test_target_bpw_checkpoint_exports_each_module_at_its_bits(tmp_path, tokenizer_dir) -> None:
    """Modules with bits of their own (--target-bpw): 3 and 4 bits as Q4_0, 5 as Q8_0, groups of 64
    as pairs of 32-weight blocks; every code carries over."""
    ckpt = _tiny_checkpoint("llama", tmp_path, tokenizer_dir, EXACT, Options(target_bpw=4.2))
    modules = json.loads((ckpt / "config.json").read_text())["quantization_config"]["modules"]
    assert len({m["bits"] for m in modules.values()}) > 1
    report = export_gguf(ckpt, tmp_path / "m.gguf", dense="f32", progress=False)
    assert report.requantized == 0 and set(report.quantized.values()) <= {"Q4_0", "Q8_0"}
    torch.testing.assert_close(_logits(tmp_path, gguf_file="m.gguf"), _logits(ckpt), atol=2e-4, rtol=1e-4)


def test_gemma_norms_are_stored_as_one_plus_weight(tmp_path, tokenizer_dir) -> None:
    """transformers cannot read Gemma (1) GGUF files: check the tensors llama.cpp reads instead."""
    ckpt = _tiny_checkpoint("gemma", tmp_path, tokenizer_dir)
    export_gguf(ckpt, tmp_path / "g.gguf", dense="f32", progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    norm = model.model.layers[0].input_layernorm.weight.detach()
    assert np.array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), (norm + 1).numpy())
    q = model.model.layers[0].self_attn.q_proj.quantized_weight()  # gemma: no rotary row order
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert torch.equal(reconstruct(np.asarray(t.data), Q4_0, q.shape), q.dequantize(torch.float32))


@pytest.mark.slow
def test_smollm2_export_has_llama_cpps_own_metadata(tmp_path, smollm2_exact) -> None:
    """The offline SmolLM2 GGUF was written by llama.cpp's converter: the export of its easyquant
    checkpoint carries the same hyperparameters, tokens, token types, merges, special ids and
    chat template; its pre-tokenizer name comes from that file (``--tokenizer-from``), since the
    tokenizer transformers rebuilt from it has lost it."""
    src, (ckpt, _) = smollm2_gguf(), smollm2_exact
    plain = export_gguf(ckpt, tmp_path / "plain.gguf", progress=False)
    assert any("--tokenizer-from" in n for n in plain.notes)
    report = export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_from=src, dense="f32", progress=False)
    assert report.requantized == 0
    ours, theirs = gguf.GGUFReader(tmp_path / "m.gguf").fields, gguf.GGUFReader(src).fields
    plain_fields = gguf.GGUFReader(tmp_path / "plain.gguf").fields
    for key, field in theirs.items():
        if key.startswith(("llama.", "tokenizer.")):
            assert ours[key].contents() == field.contents(), key
        if key.startswith(("llama.", "tokenizer.")) and key not in ("tokenizer.ggml.pre",):
            assert plain_fields[key].contents() == field.contents(), key
    assert plain_fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    torch.testing.assert_close(_logits(tmp_path, gguf_file="m.gguf"), _logits(ckpt), atol=1e-3, rtol=1e-4)


def test_bad_input_is_refused_by_name_and_leaves_no_file(tmp_path, tokenizer_dir) -> None:
    ckpt = _tiny_checkpoint("llama", tmp_path, tokenizer_dir, PLAIN)
    out = tmp_path / "x.gguf"
    with pytest.raises(EasyQuantError, match="not an easyquant checkpoint"):
        export_gguf(tmp_path / "src", out, progress=False)
    with pytest.raises(EasyQuantError, match="knows"):
        tiny_model("opt", tmp_path / "opt")
        quantize_model(tmp_path / "opt", tmp_path / "optq", PLAIN, progress=False)
        export_gguf(tmp_path / "optq", out, progress=False)
    spm = tmp_path / "spm"
    shutil.copytree(ckpt, spm)
    tok = json.loads((spm / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EasyQuantError, match="--tokenizer-from"):
        export_gguf(spm, out, progress=False)
    with pytest.raises(EasyQuantError, match="holds 49152 tokens"):
        tiny_model("qwen2", tmp_path / "qw")  # vocab 128: a GGUF of 49152 tokens is another model's
        quantize_model(tmp_path / "qw", tmp_path / "qwq", PLAIN, progress=False)
        export_gguf(tmp_path / "qwq", out, tokenizer_from=smollm2_gguf(), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    from safetensors.torch import load_file, save_file

    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.endswith("outlier_cols"))
    state[key] = state[key].flip(0)  # columns no longer ascending: a damaged CSR
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=key.rsplit(".", 1)[0]):
        export_gguf(bad, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*eqtmp"))
    export_gguf(ckpt, out, progress=False)
    with pytest.raises(EasyQuantError, match="--overwrite"):
        export_gguf(ckpt, out, progress=False)
