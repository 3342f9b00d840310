"""The Triton kernel against dequantize() and a plain matmul, on the CPU under TRITON_INTERPRET=1
(conftest.py turns the interpreter on when there is no GPU), for every bit width and layout."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import check, heavy_tailed, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.core.packing import pack
from easyquant.core.qweight import QuantizedWeight, csr_from_mask
from easyquant.runtime.kernel import KernelConfig, available, dequantize, outlier_mode, qmatmul
from easyquant.runtime.kernel.launch import _packed_rows
from easyquant.runtime.nn import KERNEL_MAX_ROWS, EasyQuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(not available(torch.zeros(1, device=DEVICE)), reason="needs Triton (GPU or TRITON_INTERPRET=1)"),
    pytest.mark.filterwarnings("ignore:.*outliers"),
]


def quantized(
    rows: int, cols: int, bits: int, group_size: int | None, n_sigma: float | None, seed: int = 0, asymmetric=False
):
    cfg = QuantConfig(
        bits=bits,
        group_size=group_size,
        n_sigma=n_sigma,
        solver="rtn",
        max_outlier_fraction=1.0,
        asymmetric=asymmetric,
        col_scale=False,  # the format's arithmetic; column scales: test_col_scale.py
    )
    return quantize_weight(heavy_tailed(rows, cols, seed=seed), cfg).to(DEVICE)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_width_layout_and_dtype(bits, group_size, dtype):
    qw = quantized(72, 200, bits, group_size, n_sigma=2.5, seed=bits)
    assert qw.outlier_count > 0
    x = torch.randn(3, 200, dtype=dtype, device=DEVICE)
    check(qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("group_size", [None, 32, 48])
def test_odd_widths_read_as_word_planes(bits, group_size):
    """Widths that do not divide 8, with rows a whole number of 32-bit words (224 and 256
    columns), are read as planes of words: decode and prefill tiles and the dequantizer match."""
    for cols in (224, 256):
        qw = quantized(40, cols, bits, group_size, n_sigma=2.5, seed=bits)
        assert _packed_rows(qw, 128)[2]
        for rows in (1, 5):
            x = torch.randn(rows, cols, dtype=torch.float32, device=DEVICE)
            check(qmatmul(x, qw), x, qw)
        assert torch.equal(dequantize(qw, torch.float32), qw.dequantize(torch.float32))


CONFIGS = [
    None,
    KernelConfig(1, 16, 32, 16),
    KernelConfig(16, 32, 64, 16, split_k=3),
    KernelConfig(32, 64, 16, 32, split_k=2),
    KernelConfig(64, 16, 128, 64),
]


@settings(max_examples=25, deadline=None)  # each example runs the kernel interpreted: seconds
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    rows=st.integers(1, 70),
    cols=st.integers(1, 300),
    batch=st.integers(0, 40),
    group=st.sampled_from([None, 16, 64, 100]),
    n_sigma=st.sampled_from([None, 2.0, 3.0]),
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
    asymmetric=st.booleans(),
)
def test_matches_dequantize_on_any_shape(bits, rows, cols, batch, group, n_sigma, config, dtype, seed, asymmetric):
    qw = quantized(rows, cols, bits, group, n_sigma, seed, asymmetric)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    check(qmatmul(x, qw, config=config), x, qw)


def test_skewed_outliers_and_wide_rows():
    """Outliers crowded into a few rows (many chunks for one tile, split across programs), and
    rows wider than 256 columns, whose outlier columns are int16."""
    rows, cols = 40, 700
    w = heavy_tailed(rows, cols, seed=3)
    qw = quantize_weight(w, QuantConfig(bits=4, group_size=None, n_sigma=None, solver="rtn", col_scale=False))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[5, ::3] = True  # 234 outliers in row 5
    mask[6, :40] = True
    mask[39, -7:] = True
    rowptr, col_idx, values = csr_from_mask(mask, w * 50)
    codes = qw.codes()
    assert col_idx.dtype == torch.int16
    packed = pack((codes.masked_fill(mask, 0) - qw.grid.qmin).to(torch.uint8), 4)
    qw = QuantizedWeight(packed, qw.scales, rowptr, col_idx, values, 4, cols, (rows, cols), torch.float32).to(DEVICE)
    x = torch.randn(5, cols, dtype=torch.float32, device=DEVICE)
    for cfg in (KernelConfig(16, 16, 64, 16, split_k=4), KernelConfig(1, 64, 256, 32), None):
        check(qmatmul(x, qw, config=cfg), x, qw)


def test_bias_and_leading_dimensions():
    qw = quantized(48, 96, 4, 32, n_sigma=3.0)
    x = torch.randn(2, 3, 96, dtype=torch.float16, device=DEVICE)
    bias = torch.randn(48, dtype=torch.float16, device=DEVICE)
    y = qmatmul(x, qw, bias)
    assert y.shape == (2, 3, 48)
    check(y.reshape(6, 48), x.reshape(6, 96), qw, bias)
    # the bias is added once, whichever program of a split-K tile or outlier path finishes
    for cfg in (KernelConfig(16, 16, 16, split_k=3), KernelConfig(1, 16, 32, split_k=3, outliers="balanced")):
        check(qmatmul(x[0], qw, bias, config=cfg), x[0], qw, bias)
    xt = torch.randn(96, 4, dtype=torch.float16, device=DEVICE).T  # not contiguous
    check(qmatmul(xt, qw), xt, qw)


def test_bad_input_is_refused():
    qw = quantized(16, 64, 4, None, 3.0)
    with pytest.raises(EasyQuantError, match="features"):
        qmatmul(torch.randn(2, 32, device=DEVICE), qw)
    with pytest.raises(EasyQuantError, match="activations"):
        qmatmul(torch.randn(2, 64, device=DEVICE).to(torch.float64), qw)
    with pytest.raises(EasyQuantError, match="quantized weight on"):
        qmatmul(torch.randn(2, 64, device=DEVICE), qw.to("meta"))
    with pytest.raises(EasyQuantError, match="power of two"):
        KernelConfig(16, 48, 64)
    with pytest.raises(EasyQuantError, match="at least 16"):
        KernelConfig(16, 8, 64)
    with pytest.raises(EasyQuantError, match="1 or at least 16"):
        KernelConfig(8, 64, 64)
    with pytest.raises(EasyQuantError, match="bias of shape"):
        qmatmul(torch.randn(2, 64, device=DEVICE), qw, torch.zeros(15, device=DEVICE))


def test_model_through_the_kernel(tmp_path):
    """A checkpoint loaded with from_pretrained gives the same logits through the kernel as through
    the dequantizing path, and generates."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("opt", src)  # OPT's linears have biases
    quantize_model(src, out, QuantConfig(bits=4, group_size=32), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(DEVICE).eval()
    layers = [m for m in model.modules() if isinstance(m, EasyQuantLinear)]
    x = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad():
        EasyQuantLinear.backend = "torch"
        ref = model(x).logits
        EasyQuantLinear.backend = "triton"
        try:
            assert all(layer.path(x.float()) == "fused" for layer in layers)
            torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)
            y = model.generate(x[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        finally:
            EasyQuantLinear.backend = "auto"
    assert y.shape == (1, 7)
    assert layers[0].path(torch.zeros(1, 64)) == ("fused" if DEVICE == "cuda" else "torch")


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_dequantize_kernel_is_exact(bits, dtype, asymmetric):
    qw = quantized(50, 300, bits, 64, n_sigma=2.5, seed=bits, asymmetric=asymmetric)
    got, want = dequantize(qw, dtype), qw.dequantize(dtype)
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter truncates fp32 to bf16: one ulp
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


def test_long_inputs_dequantize_then_matmul():
    qw = quantized(40, 64, 4, None, n_sigma=3.0)
    bias = torch.randn(40, device=DEVICE)
    layer = EasyQuantLinear.from_quantized(qw, bias)
    layer.backend = "triton"
    x = torch.randn(KERNEL_MAX_ROWS + 1, 64, device=DEVICE)
    assert layer.path(x) == "dequantize" and layer.path(x[:KERNEL_MAX_ROWS]) == "fused"
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, qw.dequantize(), bias))
    layer.backend = "cuda"
    with pytest.raises(EasyQuantError, match="backend"):
        layer(x)


def test_balanced_outliers_match_fused():
    """The balanced outlier kernel gives what the fused path gives, on crowded and on even rows,
    and outlier_mode picks it exactly for the crowded ones."""
    rows, cols = 150, 300
    w = heavy_tailed(rows, cols, seed=4)
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(4)) < 0.01
    crowded = mask.clone()
    crowded[7:9] = True  # two rows of nothing but outliers
    for m, expect in ((mask, "fused"), (crowded, "balanced")):
        qw = quantize_weight(w, QuantConfig(bits=4, group_size=None, n_sigma=None, solver="rtn", col_scale=False))
        rowptr, col_idx, values = csr_from_mask(m, w * 30)
        packed = pack((qw.codes().masked_fill(m, 0) - qw.grid.qmin).to(torch.uint8), 4)
        qw = QuantizedWeight(packed, qw.scales, rowptr, col_idx, values, 4, cols, (rows, cols), torch.float32)
        qw = qw.to(DEVICE)
        assert outlier_mode(qw) == expect
        x = torch.randn(19, cols, dtype=torch.float32, device=DEVICE)
        for cfg in (KernelConfig(16, 32, 64, 16, outliers="balanced"),
                    KernelConfig(1, 64, 128, 32, split_k=3, outliers="balanced")):  # fmt: skip
            check(qmatmul(x, qw, config=cfg), x, qw)
            check(qmatmul(x[:1], qw, config=cfg), x[:1], qw)
    with pytest.raises(EasyQuantError, match="outliers must be"):
        KernelConfig(16, 32, 64, outliers="sorted")
