"""Column scales folded into the model: the fold changes nothing the model computes, a folded
checkpoint loads with the logits of the same fold done in memory, stores no column scales where
it folded, exports exactly without outliers, and is refused where it claims an older format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from conftest import CONFIGS, claim_format, tiny_model
from easyquant import Options, QuantConfig
from easyquant.checkpoint.folds import find_folds
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.checkpoint.targets import block_linears
from easyquant.cli import main
from easyquant.core.fold import folded_weight, solve_folds
from easyquant.errors import EasyQuantError
from easyquant.eval.compare import easyquant_method, resolve
from easyquant.integrations.ct_export import export_compressed_tensors

BERT = transformers.BertConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _uneven(model: torch.nn.Module, seed: int) -> None:
    """Spread every linear's input columns over a factor of about 20, so that the folds' scales
    are far from one, and bias every norm away from one."""
    g = torch.Generator().manual_seed(seed)
    for _, lin in block_linears(model):
        lin.weight.data *= torch.exp(1.5 * torch.randn(lin.in_features, generator=g))
    for name, p in model.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            p.data = 0.5 + torch.rand(p.shape, generator=g)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert"])
def test_a_fold_changes_nothing_the_model_computes(kind: str) -> None:
    """Every fold found (grouped-query heads tied, Qwen2's v_proj bias, BERT's value bias) applied
    to the full-precision model: the same outputs, with scales that are far from one."""
    torch.manual_seed(1)
    if kind == "bert":
        model = transformers.BertModel(copy.deepcopy(BERT)).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[kind])).eval()
    _uneven(model, seed=2)
    folds = find_folds(model, lambda name: True)
    layers = model.config.num_hidden_layers
    assert len(folds) == (layers if kind == "bert" else 4 * layers)
    if kind != "bert":
        assert {f.repeat for f in folds if f.rows} == {1, 2}  # v -> o over 4 heads reading 2 value heads
    with torch.no_grad():
        want = model(IDS)[0]
        names = {name for name, _ in block_linears(model)}
        folding = solve_folds(folds, lambda k: model.get_parameter(k).data, dict.fromkeys(names, QuantConfig()))
        spread = torch.cat([c.float().log() for _, c in folding.scales.values() if c is not None]).std()
        assert spread > 0.3
        for name, lin in block_linears(model):
            lin.weight.data = folded_weight(lin.weight.data, folding.of(name))
        for key, t in folding.dense.items():
            model.get_parameter(key).data = t
        torch.testing.assert_close(model(IDS)[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "fold"), [("llama", "rows"), ("qwen2", "rows"), ("llama", "all"), ("qwen2", "all")])
def test_folded_checkpoint_loads_with_the_in_memory_logits(tmp_path, kind: str, fold: str) -> None:
    """Folded runs (rows: the default): format 7 records the folds, folded modules have no
    column scales, the rows before them (and with ``all`` the norms) are written scaled, and
    the checkpoint computes what the in-memory fold of ``easyquant compare`` computes (each
    weight unfolded into the unchanged model)."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model(kind, src)
    _uneven(model, seed=3)
    model.save_pretrained(src)
    quantize_model(src, out, QuantConfig(group_size=32), Options(fold=fold), progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    folded = {m for m, info in qc["modules"].items() if info.get("col_scale") is False}
    ends = ("o_proj", "down_proj") if fold == "rows" else ("proj",)
    assert qc["format_version"] == 7 and len(qc["folds"]) == (4 if fold == "rows" else 8)
    assert folded == {m for m in qc["modules"] if m.endswith(ends)}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert {n for n, m in loaded.named_modules() if getattr(m, "col_scale", True) is False} == folded
    layer, source = loaded.model.layers[0], model.model.layers[0]
    assert not torch.equal(layer.self_attn.v_proj.quantized_weight().dequantize(), source.self_attn.v_proj.weight)
    assert torch.equal(layer.input_layernorm.weight, source.input_layernorm.weight) == (fold == "rows")
    ref = copy.deepcopy(model)
    easyquant_method(fold=fold, group_size=32)(ref, block_linears(ref), 4, IDS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)

    claim_format(out, 6)
    with pytest.raises(EasyQuantError, match="these settings need format_version 7"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_no_fold_keeps_every_column_scale_and_gemma_is_not_folded(tmp_path) -> None:
    tiny_model("llama", tmp_path / "src")
    with pytest.raises(EasyQuantError, match="fold must be one of none, rows, all"):
        quantize_model(tmp_path / "src", tmp_path / "bad", options=Options(fold="yes"), progress=False)
    main(["quantize", str(tmp_path / "src"), str(tmp_path / "off"), "--fold", "none"])
    qc = json.loads((tmp_path / "off" / "config.json").read_text())["quantization_config"]
    assert "folds" not in qc and not any("col_scale" in m for m in qc["modules"].values())
    tiny_model("gemma", tmp_path / "gemma")  # its norms multiply by 1 + weight: no fold is known
    quantize_model(tmp_path / "gemma", tmp_path / "g", options=Options(fold="all"), progress=False)
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert "folds" not in qc and qc["col_scale"] is True
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g")


def test_bert_folds_only_value_into_output(tmp_path) -> None:
    torch.manual_seed(0)
    transformers.BertModel(copy.deepcopy(BERT)).save_pretrained(tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", QuantConfig(group_size=32), progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    folded = sorted(m for m, info in qc["modules"].items() if "col_scale" in info)
    assert folded == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert [f["into"] for f in qc["folds"]] == [f"encoder.layer.{i}.attention.self.value" for i in range(2)]
    transformers.AutoModel.from_pretrained(tmp_path / "q")


def test_an_outlier_free_default_exports_exactly(tmp_path) -> None:
    """Folded whole (``--fold all``) and without outliers, every group carries over to
    compressed-tensors: no group is solved again, and transformers gives the same logits."""
    tiny_model("llama", tmp_path / "src")
    exact = QuantConfig(group_size=32, n_sigma=None)
    quantize_model(tmp_path / "src", tmp_path / "q", exact, Options(fold="all"), progress=False)
    report = export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    assert report.requantized == 0 and report.col_scaled == 0 and report.groups > 0
    with torch.inference_mode():
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float16)(IDS).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)(IDS).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "folds, why",
    [("no list", "folds must be a list"), ([{"into": "x"}], "folds must be a list"), (None, "modules must map")],
)
def test_damaged_fold_records_are_refused(tmp_path, folds, why) -> None:
    tiny_model("llama", tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", QuantConfig(group_size=32), progress=False)
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    if folds is None:
        next(iter(config["quantization_config"]["modules"].values()))["col_scale"] = True
    else:
        config["quantization_config"]["folds"] = folds
    path.write_text(json.dumps(config))
    with pytest.raises(EasyQuantError, match=why):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_compare_specs_take_a_fold_mode() -> None:
    for mode in ("none", "rows", "all"):
        resolve(f"easyquant:fold={mode}/group_size=128")
    with pytest.raises(EasyQuantError, match="fold is one of none, rows, all"):
        resolve("easyquant:fold=yes")
    with pytest.raises(EasyQuantError, match="a bits budget is not folded"):
        resolve("easyquant:fold=all/target_bpw=4.25")
