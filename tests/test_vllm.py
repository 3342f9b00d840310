"""vLLM serves easyquant checkpoints through the plugin (entry point ``vllm.general_plugins``):
the checkpoint's ``quant_method`` selects it with no flag, and greedy decoding gives the same
tokens as transformers on the same checkpoint. vLLM (its CPU build) runs in ``.venv-vllm``
(scripts/setup.sh), one process per model, through tests/vllm_generate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import easyquant  # noqa: F401  (registers the transformers loader)
from conftest import tiny_model
from easyquant import QuantConfig
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.eval.assets import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not VLLM_PY.exists(), reason="no .venv-vllm: scripts/setup.sh makes it (EASYQUANT_VLLM=0 skips it)"
)
PROMPTS = [[1, 17, 42, 99, 5, 7], [3, 250, 11]]
# vLLM's CPU attention wants head_dim 64 or more: two heads of 64.
SIZES = {"vocab_size": 256, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
         "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 512}  # fmt: skip


def vllm_generate(model: Path, prompts: list[list[int]], max_tokens: int, tp: int = 1) -> dict:
    run = subprocess.run(
        [str(VLLM_PY), str(ROOT / "tests" / "vllm_generate.py"), str(model), "--prompt-ids", json.dumps(prompts),
         "--max-tokens", str(max_tokens), "--tp", str(tp)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("vllm_generate: "))
    return json.loads(line.removeprefix("vllm_generate: "))


@torch.inference_mode()
def hf_generate(model: Path, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy decoding in transformers (end-of-sequence ignored, as vLLM is told to) and the
    log-probability of each prompt token after the first."""
    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokens, scored = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        lp = m(x).logits[0, :-1].log_softmax(-1)
        scored.append(lp.gather(1, x[0, 1:, None])[:, 0].tolist())
        for _ in range(max_tokens):
            x = torch.cat([x, m(x).logits[:, -1:].argmax(-1)], dim=1)
        tokens.append(x[0, len(ids) :].tolist())
    return {"tokens": tokens, "prompt_logprobs": scored}


def assert_same(got: dict, want: dict) -> None:
    assert got["quant"] == "easyquant"
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["prompt_logprobs"], want["prompt_logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-3, rtol=1e-3)


def _tiny(kind: str, folder: Path) -> None:
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind](**SIZES)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # peaked logits: greedy choices far from ties, so kernels' rounding cannot flip them
        model.lm_head.weight.mul_(40)
    model.save_pretrained(folder)


@pytest.mark.parametrize(
    "kind, config, tp, options",
    [
        ("llama", QuantConfig(), 1, Options()),
        ("llama", QuantConfig(), 2, Options()),
        ("qwen2", QuantConfig(bits=3, group_size=32, outlier_scope="row"), 2, Options()),
        ("llama", QuantConfig(group_size=32, asymmetric=True), 2, Options()),
        ("llama", QuantConfig(group_size=32, col_scale=True), 2, Options()),
        ("qwen2", QuantConfig(group_size=32, n_sigma=3.0), 2, Options(target_bpw=4.5)),
    ],
    ids=[
        "llama-default",
        "llama-default-tp2",
        "qwen2-3bit-g32-bias-tp2",
        "llama-asymmetric-g32-tp2",
        "llama-col-scale-g32-tp2",
        "qwen2-target-bpw-tp2",
    ],
)
def test_vllm_matches_transformers_on_tiny_models(tmp_path, kind, config, tp, options) -> None:
    """tp=2: vLLM's own tensor parallelism (two CPU workers): q/k/v and gate/up cut by rows, o and
    down by columns, the one KV head replicated on both ranks. Dual-axis q/k/v and gate/up, each
    with column scales of its own, run as separate shards of the fused layer; so do shards with
    bits or groups of their own (--target-bpw)."""
    _tiny(kind, tmp_path / "src")
    summary = quantize_model(tmp_path / "src", tmp_path / "q", config, options, progress=False)
    if options.target_bpw:
        assert len({(r["bits"], r["group_size"]) for r in summary.layers}) > 1
    assert summary.outlier_fraction > 0  # the fused layers carry outliers through the plugin
    want = hf_generate(tmp_path / "q", PROMPTS, 12)
    assert_same(vllm_generate(tmp_path / "q", PROMPTS, 12, tp), want)


@pytest.mark.slow
def test_vllm_matches_transformers_on_smollm2(tmp_path) -> None:
    """The real model (SmolLM2-135M, from a GGUF Q4_1: quantized once already), default settings."""
    quantize_model(smollm2_gguf(), tmp_path / "q", progress=False)
    prompts = [[504, 3458, 282, 4649, 314], [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 28]]
    assert_same(vllm_generate(tmp_path / "q", prompts, 16), hf_generate(tmp_path / "q", prompts, 16))


def test_quantized_experts_are_refused_by_name(tmp_path) -> None:
    tiny_model("mixtral", tmp_path / "src")
    quantize_model(tmp_path / "src", tmp_path / "q", progress=False)
    run = subprocess.run(
        [str(VLLM_PY), str(ROOT / "tests" / "vllm_generate.py"), str(tmp_path / "q"), "--prompt-ids", "[[1, 2]]"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode != 0
    assert "model.layers.0.mlp.experts: the vLLM plugin does not serve quantized mixture-of-experts" in run.stderr


def test_plugin_is_an_entry_point_vllm_finds() -> None:
    """Installed metadata names the plugin in vLLM's group (in both environments)."""
    probe = (
        "from importlib.metadata import entry_points; "
        "print([e.value for e in entry_points(group='vllm.general_plugins')])"
    )
    for py in (sys.executable, str(VLLM_PY)):
        out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert "easyquant.integrations.vllm_plugin:register" in out
