"""compressed-tensors export: the packed tensors are compressed-tensors' own (its decompressor
gives back the weights), an outlier-free checkpoint without column scales loads in transformers
with exactly the checkpoint's logits (tiny Llama and Qwen2, SmolLM2), what the format cannot
hold is solved again and counted, and bad input is refused by name and leaves nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st

import easyquant  # noqa: F401  (registers the transformers loader)
from conftest import heavy_tailed, tiny_model
from easyquant import QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.errors import EasyQuantError
from easyquant.integrations.ct_export import Scheme, _tensors, export_compressed_tensors, pack_int32
from easyquant.integrations.regroup import regroup

EXACT = QuantConfig(group_size=32, n_sigma=None, col_scale=False)
IDS = torch.tensor([[1, 5, 90, 42, 7, 100, 11, 3]])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4, 8]), st.integers(1, 9), st.integers(1, 40))
def test_packing_is_compressed_tensors_own(seed, bits, rows, cols) -> None:
    g = torch.Generator().manual_seed(seed)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, cols), generator=g, dtype=torch.int8)
    ours = pack_int32(signed.long() + (1 << (bits - 1)), bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(pack_int32((signed.long() + (1 << (bits - 1))).T, bits).T, pack_to_int32(signed, bits, 0))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([3, 4, 8]), st.sampled_from([None, 32, 64]),
       st.sampled_from([None, 2.5]), st.booleans(), st.booleans(), st.booleans())  # fmt: skip
def test_decompressed_weights_are_the_regrouped_weights(seed, bits, group, n_sigma, asym, fractional, col) -> None:
    """compressed-tensors' own decompressor, given the exported tensors and the scheme the config
    declares, returns the regrouped weight: bit for bit the checkpoint's in every group kept (all
    of them where the checkpoint has no outliers, column scales or fractional zero points)."""
    w = heavy_tailed(16, 128, seed=seed) + (0.01 if asym else 0)
    config = QuantConfig(bits=bits, group_size=group, n_sigma=n_sigma, asymmetric=asym,
                         fractional_zero=asym and fractional, col_scale=col)  # fmt: skip
    qw = quantize_weight(w, config)
    scheme = Scheme(bits, group, asym)
    g = regroup(qw, group or 128, bits, asym, integer_zero=True)
    tensors = _tensors(g, scheme, qw.shape)
    ct = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme.weights()))
    back = PackedQuantizationCompressor.decompress(tensors, ct)["weight"]
    q = g.codes.float() - (0 if g.zeros is None else g.zeros[..., None])
    assert torch.equal(back, (q * g.scales.float()[..., None]).view(qw.shape).half())
    want = qw.dequantize(torch.float16).view(16, -1, group or 128)
    assert torch.equal(back.view_as(want)[~g.redone], want[~g.redone])
    exact = not (n_sigma or col or (asym and fractional and bits < 8))  # 8 bits leave no fractional bits
    assert g.requantized == 0 if exact else g.requantized > 0


def _pair(ckpt, out):
    """Logits of the easyquant checkpoint (in fp16, the export's dtype) and of its export."""
    with torch.inference_mode():
        ours = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert theirs.dtype == torch.float16
        return ours(IDS).logits, theirs(IDS).logits


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("llama", EXACT),
        ("qwen2", QuantConfig(group_size=32, n_sigma=None, col_scale=False, asymmetric=True)),
        ("qwen2", QuantConfig(group_size=None, n_sigma=None, col_scale=False)),
    ],
)
def test_outlier_free_checkpoint_loads_with_the_same_logits(tmp_path, kind, config) -> None:
    tiny_model(kind, tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", config, progress=False)
    report = export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    assert report.requantized == 0 and len(report.schemes) == 14
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    ours, theirs = _pair(tmp_path / "q", tmp_path / "ct")
    assert torch.equal(ours, theirs)
    assert not list(tmp_path.glob(".*eqtmp"))


@pytest.mark.slow
def test_smollm2_exports_exactly(tmp_path, smollm2_exact) -> None:
    """The real model (SmolLM2-135M from a GGUF Q4_1), quantized in groups of 32 without outliers
    or column scales: the export has the checkpoint's logits, and its tokenizer files."""
    ckpt, _ = smollm2_exact
    report = export_compressed_tensors(ckpt, tmp_path / "ct", progress=False)
    assert report.requantized == 0 and report.groups > 0
    assert (tmp_path / "ct" / "tokenizer.json").is_file() and not (tmp_path / "ct" / ".easyquant-run.json").exists()
    ours, theirs = _pair(ckpt, tmp_path / "ct")
    assert torch.equal(ours, theirs)


def test_default_and_budget_checkpoints_export(tmp_path) -> None:
    """The default with column scales at run time (``--fold none``) has every group solved again,
    each weight within its rounding of the checkpoint's, and logits about as near the source
    model's; folded whole (``--fold all``), only the groups holding outliers are; a bit budget's modules
    of their own bits become config groups of their own, carried over exactly."""
    tiny_model("llama", tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", QuantConfig(group_size=32), Options(fold="none"), progress=False)
    report = export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    assert report.requantized == report.groups > 0 and report.col_scaled == 14 and "re-solved" in report.summary()
    ours, theirs = _pair(tmp_path / "q", tmp_path / "ct")
    with torch.inference_mode():
        source = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float16)(IDS).logits
    assert (theirs - source).float().norm() < 2 * (ours - source).float().norm()

    folded = Options(fold="all")
    summary = quantize_model(tmp_path / "src", tmp_path / "f", QuantConfig(group_size=32), folded, progress=False)
    report = export_compressed_tensors(tmp_path / "f", tmp_path / "fct", progress=False)
    assert report.col_scaled == 0 and 0 < report.requantized <= sum(r["outliers"] for r in summary.layers)

    quantize_model(tmp_path / "src", tmp_path / "b", EXACT, Options(target_bpw=4.2), progress=False)
    report = export_compressed_tensors(tmp_path / "b", tmp_path / "bct", progress=False)
    groups = json.loads((tmp_path / "bct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert report.requantized == 0 and len(groups) > 1
    assert sum(len(g["targets"]) for g in groups.values()) == 14
    ours, theirs = _pair(tmp_path / "b", tmp_path / "bct")
    assert torch.equal(ours, theirs)


def test_bad_input_is_refused_by_name_and_leaves_nothing(tmp_path) -> None:
    tiny_model("llama", tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", EXACT, progress=False)
    out = tmp_path / "ct"
    with pytest.raises(EasyQuantError, match="not an easyquant checkpoint"):
        export_compressed_tensors(tmp_path / "src", out, progress=False)
    with pytest.raises(EasyQuantError, match="do not split into groups of 48"):
        export_compressed_tensors(tmp_path / "q", out, group_size=48, progress=False)
    with pytest.raises(EasyQuantError, match="overlaps the source"):
        export_compressed_tensors(tmp_path / "q", tmp_path / "q" / "ct", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "q", bad)
    from safetensors.torch import load_file, save_file

    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.endswith(".scales"))
    state[key][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=key.rsplit(".", 1)[0]):
        export_compressed_tensors(bad, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*eqtmp"))
    export_compressed_tensors(tmp_path / "q", out, progress=False)
    with pytest.raises(EasyQuantError, match="--overwrite"):
        export_compressed_tensors(tmp_path / "q", out, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(EasyQuantError, match="not a model checkpoint"):
        export_compressed_tensors(tmp_path / "q", tmp_path / "mine", overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
    report = export_compressed_tensors(tmp_path / "q", out, group_size=32, overwrite=True, progress=False)
    assert {s.group_size for s in report.schemes.values()} == {32} and report.requantized == 0
    assert not list(tmp_path.glob(".*eqtmp"))
