"""Dual-axis scaling (``col_scale``, format 3): an fp16 scale per input column beside the row or
group scales. The math (Sinkhorn's column scales, the weight it stands for, the solver's
objective in the weight's own units), every runtime (torch, CPU int4, Triton), the checkpoint
through ``from_pretrained``, damaged or missing column scales, and the export it refuses."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import check, claim_format, heavy_tailed, loads_like_memory, module_matches, per_weight, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.format import FORMAT_VERSION
from easyquant.cli import main
from easyquant.core.sinkhorn import column_scales
from easyquant.runtime.kernel import available, dequantize, qmatmul
from easyquant.runtime.nn import EasyQuantLinear


def uneven(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights whose columns differ in spread by up to 16x, as real input features do."""
    g = torch.Generator().manual_seed(seed)
    return heavy_tailed(rows, cols, seed=seed) * 2.0 ** (4 * torch.rand(cols, generator=g))


@pytest.mark.filterwarnings("ignore:.*outliers")
@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    group=st.sampled_from([None, 8, 16, 32]),
    n_sigma=st.sampled_from([None, 2.0, 3.0]),
    asymmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weight_is_column_scale_times_codes_and_outliers_stay_exact(bits, rows, cols, group, n_sigma, asymmetric, seed):
    w = uneven(rows, cols, seed)
    cfg = QuantConfig(
        bits=bits, group_size=group, n_sigma=n_sigma, asymmetric=asymmetric, col_scale=True, max_outlier_fraction=1.0
    )
    q = quantize_weight(w, cfg)
    q.check("w")
    t = q.col_scales
    assert t.dtype == torch.float16 and t.shape == (cols,) and bool((t > 0).all())
    s = per_weight(q.scales, q.group_size, cols)
    z = per_weight(q.zeros, q.group_size, cols) if asymmetric else 0.0
    deq = q.dequantize(torch.float32)
    outlier = torch.zeros_like(w, dtype=torch.bool)
    outlier[q.outlier_rows(), q.outlier_cols.long()] = True
    dense = s * (q.codes().float() - z) * t.float()
    assert torch.equal(deq[~outlier], dense[~outlier])
    assert torch.equal(deq[outlier], w[outlier].half().float())
    assert bits_counted(q) == pytest.approx(q.bits_per_weight)


def bits_counted(q) -> float:
    """The weight's bits per weight from its tensors, the column scales' 16 bits a column included."""
    return 8 * sum(v.numel() * v.element_size() for v in q.tensors().values()) / q.shape[0] / q.shape[1]


def test_sinkhorn_evens_out_the_columns():
    w = uneven(64, 256, seed=4)
    keep = torch.ones_like(w, dtype=torch.bool)
    t = column_scales(w, keep, 256)
    assert torch.equal(t, t.half().float())
    spread = w.std(0)
    evened = (w / t).std(0)
    assert evened.max() / evened.min() < 0.5 * spread.max() / spread.min()
    # groups: each group's columns are normalised as their own tile; the last one may be shorter
    assert column_scales(w, keep, 100).shape == (256,)
    # outliers (weights not kept) do not widen their column
    spiked = w.clone()
    spiked[0, 7] = 50.0
    keep_spiked = keep.clone()
    keep_spiked[0, 7] = False
    assert column_scales(spiked, keep_spiked, 256)[7] < 2 * column_scales(w, keep, 256)[7]


def test_column_scales_lower_the_error_on_uneven_columns():
    """Where input columns differ in spread, a scale per column is worth its 16 bits a column: with
    the weight's own error as the objective (``col_power=1``) it lowers that error."""
    w = uneven(128, 512, seed=6)
    for bits, group in ((4, None), (3, None), (4, 64)):
        cfg = QuantConfig(bits=bits, group_size=group, n_sigma=None, col_scale=False)
        one = quantize_weight(w, cfg).dequantize()
        two = quantize_weight(w, replace(cfg, col_scale=True, col_power=1.0)).dequantize()
        assert (two - w).norm() < 0.9 * (one - w).norm()


def test_deterministic_and_refused_settings():
    w = uneven(48, 160, seed=9)
    cfg = QuantConfig(bits=3, group_size=32, col_scale=True)
    a, b = quantize_weight(w, cfg), quantize_weight(w.clone(), cfg)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    with pytest.raises(EasyQuantError, match="col_scale must be true or false"):
        QuantConfig(col_scale=1)


def test_damaged_column_scales_are_refused():
    q = quantize_weight(uneven(16, 64, seed=1), QuantConfig(col_scale=True))
    for bad in (0.0, -1.0, float("inf")):
        t = q.col_scales.clone()
        t[3] = bad
        with pytest.raises(EasyQuantError, match="layer.col_scales holds values that are not finite and positive"):
            EasyQuantLinear.from_quantized(type(q)(**{**q.__dict__, "col_scales": t}), name="layer")
    with pytest.raises(EasyQuantError, match="col_scales has shape"):
        type(q)(**{**q.__dict__, "col_scales": q.col_scales[:-1]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_runtimes_agree(dtype):
    """The torch path and the CPU int4 kernel (bf16: the column scales multiply the dense
    product's activations, the outliers take them as they are) give the dequantized weight's product."""
    qw = quantize_weight(uneven(64, 256, seed=2), QuantConfig(group_size=64, n_sigma=2.5, col_scale=True))
    assert qw.outlier_count > 0
    lin = module_matches(qw, dtype)
    assert "col_scale=True" in repr(lin)


triton_only = pytest.mark.skipif(not available(torch.zeros(1)), reason="needs Triton (TRITON_INTERPRET=1 on the CPU)")


@triton_only
@pytest.mark.filterwarnings("ignore:.*outliers")
@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 50),
    cols=st.integers(1, 200),
    batch=st.integers(0, 20),
    group=st.sampled_from([None, 16, 64]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    asymmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_kernel_matches_dequantize(bits, rows, cols, batch, group, dtype, asymmetric, seed):
    cfg = QuantConfig(bits=bits, group_size=group, n_sigma=2.5, asymmetric=asymmetric, col_scale=True,
                      max_outlier_fraction=1.0)  # fmt: skip
    qw = quantize_weight(uneven(rows, cols, seed), cfg)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    # the column-scaled activations are rounded to the activations' dtype once more
    check(qmatmul(x, qw), x, qw, slack=qw.dequantize(torch.float32).abs() * 2.0**-10)
    assert torch.equal(dequantize(qw, torch.float32), qw.dequantize(torch.float32))


def test_checkpoint_loads_with_the_in_memory_logits(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, n_sigma=2.5, col_scale=True)
    qc, shard, tensors, summary = loads_like_memory(tmp_path, cfg)
    out = shard.parent
    assert qc["col_scale"] is True and qc["format_version"] == FORMAT_VERSION
    folded = [m for m, info in qc["modules"].items() if info.get("col_scale") is False]
    assert len(folded) == 4 and all(m.endswith(("o_proj", "down_proj")) for m in folded)  # the default: --fold rows
    assert sum(k.endswith(".col_scales") for k in tensors) == len(summary.layers) - len(folded)
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # logits checked above
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():  # in bf16, through the CPU int4 kernel
        bf16 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        lin = bf16.model.layers[0].mlp.up_proj
        assert lin.col_scale and lin.path(torch.zeros(1, 64, dtype=torch.bfloat16)) == "int4"
        torch.testing.assert_close(bf16(x).logits.float(), fp32(x).logits, rtol=0.1, atol=0.1)

    name = next(k for k in tensors if k.endswith(".col_scales"))
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][0] = 0
    save_file(bad, shard, metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=rf"{name.rsplit('.', 1)[0]}.col_scales holds values that are not"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    save_file({k: v for k, v in tensors.items() if k != name}, shard, metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=rf"no tensor {name}"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    save_file(tensors, shard, metadata={"format": "pt"})
    claim_format(out, 2)  # folded (format 7), and dual-axis (3)
    with pytest.raises(EasyQuantError, match="these settings need format_version 7"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_cli_flag(tmp_path):
    tiny_model("llama", tmp_path / "src")
    main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--col-scale", "--group-size", "32"])
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["col_scale"] is True and qc["group_size"] == 32
