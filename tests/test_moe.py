"""Mixture-of-experts models: experts quantized expert by expert, from both on-disk layouts
(transformers' fused 3-D tensors, and one 2-D tensor per expert), loaded as EasyQuantExperts.
(Save, load, logits against the dequantized model and generate, for every family: test_models.)"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import check, tiny_model
from easyquant import EasyQuantError, QuantConfig
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.runtime.nn import EasyQuantLinear


def fused_layout(model, folder):
    """The model saved with its experts as the fused 3-D tensors it holds in memory. (Its
    ``save_pretrained`` writes Mixtral and Qwen MoE the way their checkpoints on disk are: one
    2-D tensor per expert, Mixtral's under ``block_sparse_moe.experts.{e}.w1``; gpt-oss fused.)"""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    model.config.save_pretrained(folder)


def logits(folder, x, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_per_expert_and_fused_layouts_quantize_alike(kind, tmp_path):
    model = tiny_model(kind, tmp_path / "split")
    assert any(".experts.0." in k for k in load_file(tmp_path / "split" / "model.safetensors"))
    fused_layout(model, tmp_path / "fused")
    x = torch.randint(0, 128, (2, 10))
    # transformers itself reads both layouts into the same model
    torch.testing.assert_close(logits(tmp_path / "split", x), logits(tmp_path / "fused", x), rtol=0, atol=0)
    cfg = QuantConfig(group_size=32)
    a = quantize_model(tmp_path / "fused", tmp_path / "qa", cfg, progress=False)
    b = quantize_model(tmp_path / "split", tmp_path / "qb", cfg, progress=False)
    assert [r for r in a.layers if r.get("expert")] == [r for r in b.layers if r.get("expert")]
    assert len([r for r in b.layers if r.get("expert")]) == 16
    qa, qb = (load_file(tmp_path / q / "model.safetensors") for q in ("qa", "qb"))
    experts = [k for k in qa if ".experts." in k]
    assert experts and all(torch.equal(qa[k], qb[k]) for k in experts)  # the same codes, scales and outliers
    assert not any(".experts.0." in k and k.endswith(".weight") for k in qb), "per-expert sources left behind"
    torch.testing.assert_close(logits(tmp_path / "qb", x), logits(tmp_path / "qa", x), rtol=0, atol=0)


@pytest.mark.parametrize("col_scale", [False, True])
def test_only_routed_experts_run_and_kernels_serve_them(tmp_path, col_scale):
    tiny_model("mixtral", tmp_path / "src")
    cfg = QuantConfig(group_size=32, n_sigma=2.0, col_scale=col_scale)
    quantize_model(tmp_path / "src", tmp_path / "q", cfg, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16).eval()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj[0].col_scale == col_scale
    calls = []
    for e, layer in enumerate(experts.gate_up_proj):
        layer.register_forward_hook(lambda mod, args, out, e=e: calls.append((e, mod.path(args[0]))))
    with torch.no_grad():
        model(torch.tensor([[5]]))  # one token, routed to top-2 of 4 experts
    assert len(calls) == 2 and all(path == "int4" for _, path in calls)  # torch's CPU int4 kernel
    # Each expert's layer through the Triton kernel (interpreted here) and torch's int4 kernel agree
    # with the exact product of its dequantized weight.
    layer = experts.gate_up_proj[calls[0][0]]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    for backend in ("triton", "auto"):
        layer.backend = backend
        check(layer(x), x, layer.quantized_weight())


def test_bad_expert_is_named(tmp_path):
    fused_layout(tiny_model("qwen3_moe", tmp_path / "split"), tmp_path / "src")
    state = load_file(tmp_path / "src" / "model.safetensors")
    key = "model.layers.1.mlp.experts.gate_up_proj"
    state[key][2, 5, 7] = float("nan")
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=r"experts\.gate_up_proj\[2\]: weight holds 1 NaN"):
        quantize_model(tmp_path / "src", tmp_path / "q", progress=False)


def test_per_expert_tensor_of_the_wrong_shape_is_named(tmp_path):
    tiny_model("mixtral", tmp_path / "split")
    state = load_file(tmp_path / "split" / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    state[key] = state[key][:-1].clone()
    save_file(state, tmp_path / "split" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=r"expert 1 of model\.layers\.0\.mlp\.experts\.gate_up_proj .*w3\.weight"):
        quantize_model(tmp_path / "split", tmp_path / "q", progress=False)


def test_experts_left_out_are_counted_and_warned(tmp_path):
    tiny_model("mixtral", tmp_path / "src")
    with pytest.warns(UserWarning, match=r"only \d+% of the model's weights were quantized"):
        s = quantize_model(tmp_path / "src", tmp_path / "q", options=Options(skip=("*.experts.*",)), progress=False)
    assert not any(r.get("expert") for r in s.layers) and s.quantized_share < 0.5
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert not any(".experts" in m for m in modules)
    assert "linear layers, " in s.line() and "of the model's" in s.line()


def test_router_stays_unless_included(tmp_path):
    tiny_model("qwen2_moe", tmp_path / "src")  # its shared-expert gate is an nn.Linear
    s = quantize_model(tmp_path / "src", tmp_path / "a", progress=False)
    assert not any(r["module"].endswith("shared_expert_gate") for r in s.layers)
    s = quantize_model(tmp_path / "src", tmp_path / "b", options=Options(include=("*.shared_expert_gate",)),
                       progress=False)  # fmt: skip
    assert sum(r["module"].endswith("shared_expert_gate") for r in s.layers) == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, EasyQuantLinear)


def test_bad_experts_checkpoint_is_refused_on_load(tmp_path):
    tiny_model("qwen3_moe", tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", progress=False)
    cfg_path = tmp_path / "q" / "config.json"
    good = cfg_path.read_text()
    cfg = json.loads(good)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.experts"]["outliers"]["gate_up_proj"].pop()
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EasyQuantError, match=r"lists 3 experts of model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg_path.write_text(good)
    state = load_file(tmp_path / "q" / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj.2.scales"]
    save_file(state, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=r"no tensor model\.layers\.1\.mlp\.experts\.down_proj\.2\.scales"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
