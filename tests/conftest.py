import copy
import os

import torch

if not torch.cuda.is_available():
    # Kernel tests run on the CPU under Triton's interpreter, which is chosen when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import transformers

from easyquant.core.qweight import QuantizedWeight

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, not two that contend
    torch.set_num_threads(1)

EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def check(
    y: torch.Tensor,
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    slack: torch.Tensor | None = None,
) -> None:
    """Each output within the rounding of the activations' dtype (weights and output) plus fp32
    accumulation over K terms, measured on sum |x| |w|, from the exact product with the
    dequantized weight: a misplaced code or outlier breaks it, most sharply in fp32. ``slack``:
    a further absolute error per weight that the kernel is allowed (``(rows, cols)``)."""
    w = qw.dequantize(torch.float32)
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    size = x.double().abs() @ w.double().abs().T + ref.abs()
    subnormal_step = torch.finfo(x.dtype).smallest_normal * EPS[x.dtype]
    bound = (2 * EPS[x.dtype] + x.shape[-1] * EPS[torch.float32]) * size + subnormal_step
    if slack is not None:
        bound = bound + x.double().abs() @ slack.double().T
    assert y.dtype == x.dtype and y.shape == ref.shape
    excess = ((y.double() - ref).abs() - bound).max().item() if y.numel() else -1
    assert excess <= 0, f"kernel output off by more than the rounding bound ({excess:.3g})"


def per_weight(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Per-group values ``(rows, groups)`` spread over each group's columns, in fp32."""
    return t.float().repeat_interleave(group, dim=1)[:, :cols]


def heavy_tailed(rows: int, cols: int, seed: int = 0, df: float = 4.0, scale: float = 0.02) -> torch.Tensor:
    """Student-t weights: a heavy tail like real LLM weights, so n-sigma finds outliers."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).square().sum(-1)
    return (normal / (chi2 / df).sqrt() * scale).float()


# Files by their time in one process, longest first (docs/development.md, "CI time"). CI runs two
# xdist workers with --dist loadfile (a file's tests on one worker, so a module's fixtures, such
# as the one vLLM process of test_vllm.py, are made once) and --no-loadscope-reorder (files in
# this order, not by their count of tests):
# the long ones start at once and overlap the many short ones instead of ending the run alone.
LONGEST_FILES = (
    "test_vllm.py",
    "test_bench.py",
    "test_safety.py",
    "test_kernel.py",
    "test_models.py",
    "test_real_model.py",
    "test_gguf_export.py",
    "test_ct_export.py",
    "test_loader.py",
    "test_quantize.py",
    "test_study.py",
    "test_allocate.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, name in enumerate(LONGEST_FILES) if item.path.name == name), len(LONGEST_FILES))

    items.sort(key=rank)  # stable: the order within each file, and of the other files, is kept


def _shared_smollm2(tmp_path_factory, name: str, config) -> tuple[object, object]:
    """SmolLM2-135M (the offline GGUF) quantized once per run with ``config``, for every test and
    every xdist worker that needs it: the folder and the run's summary. The first worker to come
    quantizes under a file lock; the others find the finished checkpoint, which ``quantize_model``
    recognises as complete and returns the recorded summary of."""
    import hashlib
    from dataclasses import asdict

    from filelock import FileLock

    from easyquant import Options, quantize_model
    from easyquant.checkpoint.format import FORMAT_VERSION
    from easyquant.eval.assets import smollm2_gguf

    # One folder above every worker's own; named by the settings, so that a run of other code never
    # finds the checkpoint of an earlier run made with other settings.
    run = repr((config.to_dict(), asdict(Options()), FORMAT_VERSION)).encode()
    folder = tmp_path_factory.getbasetemp().parent / f"smollm2-{name}-{hashlib.sha256(run).hexdigest()[:8]}"
    with FileLock(f"{folder}.lock"):
        summary = quantize_model(smollm2_gguf(), folder, config, workers=2, progress=False)
    return folder, summary


@pytest.fixture(scope="session")
def smollm2_default(tmp_path_factory) -> tuple[object, object]:
    """SmolLM2 with the default settings."""
    from easyquant import QuantConfig

    return _shared_smollm2(tmp_path_factory, "default", QuantConfig())


@pytest.fixture(scope="session")
def smollm2_exact(tmp_path_factory) -> tuple[object, object]:
    """SmolLM2 in groups of 32 without outliers or column scales: what GGUF and compressed-tensors
    hold exactly."""
    from easyquant import QuantConfig

    return _shared_smollm2(tmp_path_factory, "exact", QuantConfig(group_size=32, n_sigma=None, col_scale=False))


@pytest.fixture
def weight() -> torch.Tensor:
    return heavy_tailed(96, 200, seed=1)


COMMON = {"vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
CONFIGS = {
    "llama": transformers.LlamaConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2),
    "qwen2": transformers.Qwen2Config(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2),
    "mistral": transformers.MistralConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2),
    "gemma": transformers.GemmaConfig(
        **COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, head_dim=16
    ),
    "opt": transformers.OPTConfig(
        vocab_size=128,
        hidden_size=64,
        num_attention_heads=4,
        ffn_dim=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    ),
    "bloom": transformers.BloomConfig(vocab_size=128, hidden_size=64, n_head=4, n_layer=2),
}
MOE = dict(COMMON, num_hidden_layers=2, num_key_value_heads=2, num_experts_per_tok=2)
MOE_CONFIGS = {
    "mixtral": transformers.MixtralConfig(**MOE, intermediate_size=48, num_local_experts=4),
    "qwen2_moe": transformers.Qwen2MoeConfig(
        **MOE, intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64, num_experts=4
    ),
    "qwen3_moe": transformers.Qwen3MoeConfig(
        **MOE, intermediate_size=96, moe_intermediate_size=48, num_experts=4, head_dim=16
    ),
    "gpt_oss": transformers.GptOssConfig(**MOE, intermediate_size=48, num_local_experts=4, head_dim=16),
}
CONFIGS |= MOE_CONFIGS


def tiny_model(kind: str, folder, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random model of ``kind``, saved to ``folder``; built from a copy of the shared config,
    which casting a model rewrites (``config.dtype``)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[kind])).to(dtype).eval()
    model.save_pretrained(folder)
    return model


def quantized_in_memory(model, config):
    """``model`` with each weight ``easyquant quantize`` quantizes (the block linears, every
    expert) replaced in memory by its dequantized self, column scales folded as it folds them
    (``easyquant compare``'s path; each folded weight unfolded into the unchanged model)."""
    from dataclasses import asdict

    from easyquant.checkpoint.targets import block_linears
    from easyquant.eval.compare import easyquant_method

    settings = {k: v for k, v in asdict(config).items() if k != "bits"}
    easyquant_method(**settings)(model, block_linears(model), config.bits, None)
    return model


def loads_like_memory(tmp_path, config, kind: str = "llama") -> tuple[dict, object, dict, object]:
    """A tiny ``kind`` model quantized with ``config`` into ``tmp_path / "out"``, checked to load
    with the logits of the same model with each quantized weight replaced in memory by its
    dequantized self, and to differ from the original model's. Returns the
    ``quantization_config``, the shard's path, its tensors and the run's summary."""
    import json

    from safetensors.torch import load_file

    from easyquant.checkpoint.pipeline import quantize_model

    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model(kind, src)
    summary = quantize_model(src, out, config, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    shard = next(out.glob("*.safetensors"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = quantized_in_memory(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), config)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x).logits, ref(x).logits, atol=1e-4)
    return qc, shard, load_file(shard), summary


def claim_format(out, version: int) -> None:
    """Rewrite the checkpoint's recorded format version, and before format 6 its row pointers as
    int32 ``(rows + 1,)`` (what an older writer would have put)."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    (out / "config.json").write_text(json.dumps(config))
    if version >= 6:
        return
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for key in [k for k in tensors if k.endswith(".outlier_rowptr")]:
            rows = tensors[key.removesuffix("outlier_rowptr") + "packed"].shape[0]
            ptr = tensors[key].long() if tensors[key].numel() else torch.zeros(rows + 1, dtype=torch.long)
            tensors[key] = ptr.int()
        save_file(tensors, shard, metadata={"format": "pt"})


def module_matches(qw, dtype: torch.dtype):
    """``qw``'s module in ``dtype`` takes its path for that dtype on the CPU (torch's int4
    kernel for bf16) and computes the dequantized weight's product; returns the module."""
    from easyquant.runtime.nn import EasyQuantLinear

    lin = EasyQuantLinear.from_quantized(qw).to(dtype)
    x = torch.randn(3, qw.shape[1], dtype=dtype)
    assert lin.path(x) == ("int4" if dtype == torch.bfloat16 else "torch")
    want = x.double() @ qw.dequantize(torch.float32).double().T
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lin(x).double(), want, rtol=tol, atol=tol * want.abs().max().item())
    return lin
