"""Whole models: tiny random models built from transformers configs, quantized, saved,
loaded back with from_pretrained, and compared with the same model dequantized in memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import CONFIGS, MOE_CONFIGS, check, quantized_in_memory, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.format import FORMAT_VERSION
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.checkpoint.targets import block_linears, expert_matrices
from easyquant.runtime.nn import EasyQuantExperts, EasyQuantLinear


def dequantized_copy(model, folder_out, config: QuantConfig):
    """The reference: the same model with each weight the checkpoint lists replaced by its
    dequantized self (experts one by one, transposed layouts turned; column scales folded as
    the run folds them)."""
    modules = json.loads((folder_out / "config.json").read_text())["quantization_config"]["modules"]
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    quantized_in_memory(ref, config)
    listed = {n for n, _ in block_linears(ref)} | {m.rsplit(".", 1)[0] for m, _ in expert_matrices(ref)}
    assert listed == set(modules)
    return ref


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_quantize_save_load_generate(kind, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model(kind, src)
    cfg = QuantConfig(bits=4, group_size=32)
    summary = quantize_model(src, out, cfg, progress=False)
    assert summary.layers and 4 < summary.bits_per_weight < 5.5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        qc["quant_method"] == "easyquant"
        and qc["bits"] == 4
        and qc["group_size"] == 32
        and qc["format_version"] == FORMAT_VERSION  # compact row pointers (6), folds (7)
    )
    assert "lm_head" not in qc["modules"]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    quantized = [m for m in loaded.modules() if isinstance(m, EasyQuantLinear)]
    assert len(quantized) == len(summary.layers)
    assert not any(isinstance(m, torch.nn.Linear) and n in qc["modules"] for n, m in loaded.named_modules())
    if kind in MOE_CONFIGS:  # every expert of both fused parameters, in both blocks
        experts = [r for r in summary.layers if r.get("expert")]
        assert len(experts) == 2 * 2 * 4 and summary.quantized_share > 0.8
        assert all(isinstance(m, EasyQuantExperts) for n, m in loaded.named_modules() if n.endswith(".experts"))

    ref = dequantized_copy(model, out, cfg)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
        # and it is a real quantization: the logits moved
        assert not torch.allclose(model(x).logits, ref(x).logits, atol=1e-4)
    y = loaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert y.shape == (1, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_any_shape_and_dtype(dtype):
    w = torch.randn(24, 40) * 0.05
    qw = quantize_weight(w.to(dtype), QuantConfig(group_size=16))
    bias = torch.randn(24)
    mod = EasyQuantLinear.from_quantized(qw, bias)
    mod.backend = "torch"  # the exact reference path (the kernels have their own tests)
    for shape in [(40,), (3, 40), (2, 5, 40)]:
        x = torch.randn(*shape).to(dtype)
        y = mod(x)
        assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
        # The torch path is dequantize() then F.linear in the activations' dtype, exactly.
        torch.testing.assert_close(
            y, torch.nn.functional.linear(x, qw.dequantize(dtype), bias.to(dtype)), rtol=0, atol=0
        )
        check(y.reshape(-1, 24), x.reshape(-1, 40), qw, bias)


def test_linear_follows_its_parameters():
    """The module's QuantizedWeight view is kept between calls, never past a change of weights:
    in-place loads, ``.data`` swaps and replaced parameters (``load_state_dict(assign=True)``)."""
    cfg = QuantConfig(group_size=16, n_sigma=2.0)
    q1 = quantize_weight(torch.randn(24, 40) * 0.05, cfg)
    other = quantize_weight(torch.randn(24, 40) * 0.05, cfg)
    q2 = dataclasses.replace(q1, packed=other.packed, scales=other.scales, outlier_values=-q1.outlier_values)
    assert q1.outlier_count > 0
    x = torch.randn(3, 40)

    def expect(qw):
        return torch.nn.functional.linear(x, qw.dequantize(torch.float32))

    mod = EasyQuantLinear.from_quantized(q1)
    torch.testing.assert_close(mod(x), expect(q1))
    assert mod.quantized_weight() is mod.quantized_weight()
    mod.packed.data = q2.packed
    mod.scales.data.copy_(q2.scales)  # the outliers still q1's: a mix, which the output must show
    torch.testing.assert_close(mod(x), expect(dataclasses.replace(q2, outlier_values=q1.outlier_values)))
    mod.load_state_dict(EasyQuantLinear.from_quantized(q2).state_dict(), assign=True)
    torch.testing.assert_close(mod(x), expect(q2))


def test_encoder_checkpoint(tmp_path):
    from easyquant.eval.assets import minilm_dir

    out = tmp_path / "q"
    summary = quantize_model(minilm_dir(), out, QuantConfig(bits=4, group_size=64), progress=False)
    assert len(summary.layers) == 36  # 6 blocks x (q, k, v, attn out, intermediate, output)
    # sentence-transformers' module configs come along (modules.json names 1_Pooling)
    for f in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / f).read_bytes() == (minilm_dir() / f).read_bytes()
    enc = transformers.AutoModel.from_pretrained(out).eval()
    ref = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    x = tok(["Stocks fell in Sydney.", "The bushfires spread overnight."], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = enc(**x).last_hidden_state.mean(1), ref(**x).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.95


def _checkpoint_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_parallel_and_sharded_output_is_identical(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", src)
    quantize_model(src, tmp_path / "a", progress=False)
    quantize_model(src, tmp_path / "b", workers=2, progress=False)
    assert _checkpoint_bytes(tmp_path / "a") == _checkpoint_bytes(tmp_path / "b")
    quantize_model(src, tmp_path / "c", options=Options(max_shard_bytes=20_000), progress=False)
    assert len(list((tmp_path / "c").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    c = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    x = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(a(x).logits, c(x).logits)


def test_skip_and_include(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", src)
    s = quantize_model(
        src, tmp_path / "o", options=Options(skip=("*.mlp.down_proj",), include=("lm_head",)), progress=False
    )
    names = {r["module"] for r in s.layers}
    assert "lm_head" in names and not any(n.endswith("down_proj") for n in names)


def test_sharded_source(tmp_path):
    src = tmp_path / "src"
    model = tiny_model("qwen2", src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    quantize_model(src, tmp_path / "a", progress=False)
    quantize_model(sharded, tmp_path / "b", progress=False)
    # The same tensors in, the same checkpoint out: byte for byte.
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("kind", "units", "target_bpw"),
    [("llama", 14, None), ("mixtral", 8 + 16, None), ("llama", 14, 4.4), ("mixtral", 8 + 16, 4.4)],
)
def test_resume_after_interruption_gives_identical_checkpoint(tmp_path, kind, units, target_bpw):
    """Also under a bits budget: the resumed run quantizes each layer as the plan it kept says."""
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    tiny_model(kind, src)
    options = Options(target_bpw=target_bpw)
    quantize_model(src, tmp_path / "clean", options=options, progress=False)
    out = tmp_path / "resumed"
    code = (
        "import sys, easyquant, easyquant.checkpoint.workers as w, time\n"
        "orig = w.quantize_unit\n"
        "def slow(*a, **k):\n    r = orig(*a, **k); time.sleep(0.3); return r\n"
        "w.quantize_unit = slow\n"
        f"easyquant.quantize_model({str(src)!r}, {str(out)!r}, options=easyquant.Options(target_bpw={target_bpw}), "
        "progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    layers = out / ".easyquant-work" / "layers"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(layers.glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(list(layers.glob("*.safetensors")))
    assert 3 <= done < units, "the run should have been killed part-way"
    assert not (out / "config.json").exists()
    assert (out / ".easyquant-work" / "plan.json").is_file() == (target_bpw is not None)
    quantize_model(src, out, options=options, progress=False)
    assert _checkpoint_bytes(tmp_path / "clean") == _checkpoint_bytes(out)
    assert not (out / ".easyquant-work").exists()


# ---- bad input ----


def test_output_folder_rules(tmp_path):
    """A folder of other files is never written into or deleted, --overwrite or not; an easyquant
    checkpoint is replaced only with --overwrite."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(EasyQuantError, match="holds files that are not an easyquant checkpoint"):
            quantize_model(src, out, overwrite=overwrite, progress=False)
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    summary = quantize_model(src, out, progress=False)
    first = _checkpoint_bytes(out)
    again = quantize_model(src, out, progress=False)  # the same command on a complete checkpoint: nothing to do
    assert again == summary and _checkpoint_bytes(out) == first
    with pytest.raises(EasyQuantError, match="holds a checkpoint or run with other settings; pass --overwrite"):
        quantize_model(src, out, QuantConfig(bits=3), progress=False)
    quantize_model(src, out, QuantConfig(bits=3), overwrite=True, progress=False)
    assert _checkpoint_bytes(out) != first
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    (out / ".easyquant-run.json").unlink()  # a checkpoint without its run record (made by hand, or older)
    with pytest.raises(EasyQuantError, match="already holds an easyquant checkpoint; pass --overwrite"):
        quantize_model(src, out, progress=False)


def test_refuses_resume_with_other_settings(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    out.mkdir()
    (out / ".easyquant-run.json").write_text('{"settings": {}}')
    with pytest.raises(EasyQuantError, match="holds a checkpoint or run with other settings"):
        quantize_model(src, out, progress=False)


def test_index_naming_absent_shard(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen2", src)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00009.safetensors"}}))
    with pytest.raises(EasyQuantError, match="names shards that are not in.*model-00009"):
        quantize_model(src, tmp_path / "o", progress=False)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_shard(tmp_path, damage):
    src = tmp_path / "src"
    tiny_model("llama", src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(EasyQuantError, match=r"model\.safetensors: corrupt or truncated"):
        quantize_model(src, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize("damage", ["column", "rowptr"])
def test_damaged_outliers_are_refused_on_load(tmp_path, damage):
    """A checkpoint whose outlier arrays point outside the matrix (kernels would read out of
    bounds) is refused by name when it loads."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    quantize_model(src, out, QuantConfig(n_sigma=2.0), progress=False)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    name = next(k[: -len(".outlier_cols")] for k, v in tensors.items() if k.endswith(".outlier_cols") and v.numel())
    if damage == "column":
        tensors[f"{name}.outlier_cols"][0] = 200  # rows are 64 or 96 wide
    else:
        tensors[f"{name}.outlier_rowptr"][1] = -1
    save_file(tensors, shard, metadata={"format": "pt"})
    field = {"column": "outlier_cols", "rowptr": "outlier_rowptr"}[damage]
    with pytest.raises(EasyQuantError, match=rf"{name.split('model.', 1)[-1]}\.{field}"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_pickle_only_checkpoint(tmp_path):
    src = tmp_path / "src"
    model = tiny_model("llama", src)
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(EasyQuantError, match="pickle.*--allow-pickle"):
        quantize_model(src, tmp_path / "o", progress=False)
    s = quantize_model(src, tmp_path / "o", overwrite=True, allow_pickle=True, progress=False)
    assert len(s.layers) == 14


def test_unknown_model_type(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llamazing"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EasyQuantError, match="does not know this model.*llamazing"):
        quantize_model(src, tmp_path / "o", progress=False)


def test_unsupported_weight_dtype(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", src)
    state = load_file(src / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = (state[key] * 100).to(torch.int8)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=rf"{key}: dtype torch.int8 is not a floating-point"):
        quantize_model(src, tmp_path / "o", progress=False)


def test_missing_source(tmp_path):
    with pytest.raises(EasyQuantError, match="does not exist"):
        quantize_model(tmp_path / "nope", tmp_path / "o", progress=False)


def test_disk_full_leaves_no_complete_looking_checkpoint(tmp_path):
    import subprocess
    import sys

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    # A file-size limit makes big writes fail like a full disk does (EFBIG instead of ENOSPC).
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\n"
        "from easyquant.cli import main\n"
        f"sys.exit(main(['quantize', {str(src)!r}, {str(out)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert "could not write the checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors"))


def test_ray_executor_matches_local(tmp_path):
    import ray

    src = tmp_path / "src"
    tiny_model("llama", src)
    quantize_model(src, tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        quantize_model(src, tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert _checkpoint_bytes(tmp_path / "local") == _checkpoint_bytes(tmp_path / "ray")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs in GPU sessions: scripts/gpu_session.sh)")
def test_quantize_on_cuda(tmp_path):
    """--device cuda (one worker per GPU) gives a checkpoint that loads on the GPU, runs through
    the kernel and agrees with the CPU-made one."""
    src = tmp_path / "src"
    tiny_model("llama", src)
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(src, tmp_path / "cpu", cfg, progress=False)
    summary = quantize_model(src, tmp_path / "gpu", cfg, device="cuda", progress=False)
    assert summary.layers
    x = torch.randint(0, 128, (2, 12), device="cuda")
    logits = []
    for out in ("cpu", "gpu"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float16).cuda().eval()
        layer = next(m for m in model.modules() if isinstance(m, EasyQuantLinear))
        assert layer.path(torch.zeros(1, layer.in_features, device="cuda", dtype=torch.float16)) == "fused"
        with torch.no_grad():
            logits.append(model(x).logits.float())
    torch.testing.assert_close(logits[0], logits[1], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed: it would start a cluster")
def test_cli_passes_the_executor_on(tmp_path, capsys):
    """`--executor ray` reaches the pipeline (which, without Ray installed, says how to get it)."""
    from easyquant.cli import main

    tiny_model("llama", tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--executor", "ray"]) == 2
    assert "--executor ray needs Ray: pip install 'easyquant[ray]'" in capsys.readouterr().err
