"""Loading trusts nothing: the quantization config, the safetensors headers and the CSR arrays
are checked on every way in (``from_pretrained``, ``load_state_dict``, ``from_quantized``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import heavy_tailed, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.format import FORMAT_VERSION
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.runtime.nn import EasyQuantLinear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", tmp / "src")
    quantize_model(tmp / "src", tmp / "q", QuantConfig(group_size=32, n_sigma=2.0), progress=False)
    return tmp / "q"


def edited(checkpoint, tmp_path, edit_config=None, edit_tensors=None):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(checkpoint, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda qc: qc.update(to_dict=1), r"unknown keys \['to_dict'\]"),
        (lambda qc: qc.pop("modules"), r"missing keys \['modules'\]"),
        (lambda qc: qc.update(bits="4"), "bits must be an integer"),
        (lambda qc: qc.update(bits=9), "bits must be an integer"),
        (lambda qc: qc.update(group_size=0), "group_size must be"),
        (lambda qc: qc.update(format_version=FORMAT_VERSION + 1), f"format {FORMAT_VERSION + 1}; upgrade"),
        (lambda qc: qc.update(format_version="1"), "format_version must be"),
        (lambda qc: qc.update(n_sigma="3"), "quantization_config: "),
        (lambda qc: qc["modules"][Q].update(outliers=-1), "modules must map"),
        (lambda qc: qc["modules"][Q].update(outliers=True), "modules must map"),
        (lambda qc: qc["modules"][Q].update(outliers=10**15), r"lists 1000000000000000 outliers, more than its 64x64"),
        (lambda qc: qc["modules"].update({"model.norm": {"outliers": 0}}), "no Linear for"),
        (lambda qc: qc["modules"].pop(Q), rf"holds {Q}\.\w+, of a module its quantization_config does not list"),
        (lambda qc: qc["modules"][Q].update(outliers=qc["modules"][Q]["outliers"] + 1), rf"{Q}.outlier_cols is"),
    ],
)
def test_bad_quantization_config_is_refused(checkpoint, tmp_path, edit, match):
    out = edited(checkpoint, tmp_path, edit_config=edit)
    with pytest.raises(EasyQuantError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update({f"{Q}.packed": t[f"{Q}.packed"].to(torch.int8)}), rf"{Q}\.packed is I8 .* expected"),
        (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()}), rf"{Q}\.scales is F32"),
        (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:, :1].clone()}), rf"{Q}\.scales is F16 \[64, 1\]"),
        (lambda t: t.pop(f"{Q}.outlier_values"), rf"no tensor {Q}\.outlier_values"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), r"model\.norm\.weight is F32 \[3\]"),
        (lambda t: t[f"{Q}.scales"].view(-1).__setitem__(0, float("inf")), rf"{Q}\.scales holds NaN or Inf"),
        (lambda t: t[f"{Q}.outlier_values"].__setitem__(0, float("nan")), rf"{Q}\.outlier_values holds NaN"),
    ],
)
def test_bad_tensors_are_refused_by_name(checkpoint, tmp_path, edit, match):
    out = edited(checkpoint, tmp_path, edit_tensors=edit)
    with pytest.raises(EasyQuantError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_unsorted_outlier_columns_are_refused(checkpoint, tmp_path):
    def swap(t):
        ptr, cols = t[f"{Q}.outlier_rowptr"].long(), t[f"{Q}.outlier_cols"]
        row = int(((ptr[1:] - ptr[:-1]) >= 2).nonzero()[0])  # a row with two outliers
        a = int(ptr[row])
        cols[a], cols[a + 1] = cols[a + 1].clone(), cols[a].clone()

    out = edited(checkpoint, tmp_path, edit_tensors=swap)
    with pytest.raises(EasyQuantError, match=rf"{Q}\.outlier_cols is not strictly ascending"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_corrupt_header_is_refused_by_file(checkpoint, tmp_path):
    out = edited(checkpoint, tmp_path)
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[0:8] = (2**40).to_bytes(8, "little")
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(EasyQuantError, match=r"model\.safetensors: corrupt .*header length"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def _module(n_sigma=2.0):
    return EasyQuantLinear.from_quantized(quantize_weight(heavy_tailed(24, 40), QuantConfig(n_sigma=n_sigma)))


def test_load_state_dict_checks_before_replacing():
    mod = _module()
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    bad = {k: v.clone() for k, v in before.items()}
    bad["outlier_cols"][0] = 40  # one past the last column
    with pytest.raises(EasyQuantError, match=r"outlier_cols holds columns outside 0\.\.39"):
        mod.load_state_dict(bad)
    wrong_dtype = {**before, "packed": before["packed"].to(torch.int16)}
    with pytest.raises(EasyQuantError, match=r"packed: got torch\.int16 \[24, 20\], expected torch\.uint8"):
        mod.load_state_dict(wrong_dtype)
    assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items()), "the module changed"
    parent = torch.nn.Sequential(mod)
    with pytest.raises(EasyQuantError, match=r"^0\.outlier_cols"):
        parent.load_state_dict({f"0.{k}": v for k, v in bad.items()})


def test_from_quantized_checks():
    import dataclasses

    qw = quantize_weight(heavy_tailed(24, 40), QuantConfig(n_sigma=2.0))
    bad = dataclasses.replace(qw, outlier_rowptr=qw.outlier_rowptr.flip(0))
    with pytest.raises(EasyQuantError, match=r"layer\.outlier_rowptr is not a valid CSR"):
        EasyQuantLinear.from_quantized(bad, name="layer")


def test_loader_fuzz_reduced_form(tmp_path):
    """bench/fuzz.py with 1,000 cases (the full 10,000-case run is in RESULTS.md): every mutated
    checkpoint is refused with an EasyQuantError or loads correctly; a crash fails the process."""
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "bench/fuzz.py", "--cases", "1000", "--seed", "7", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["cases"] == 1000
    by_kind = result["by_kind"]
    assert all(sum(r.values()) == 200 and r["hang"] == 0 for r in by_kind.values())
    assert all(r["refused"] > 0 for r in by_kind.values()), "every kind of mutation must reach a refusal"
    assert by_kind["csr"]["loaded"] > 0, "harmless edits (codes) must still load"
