"""torch's CPU int4 kernel behind EasyQuantLinear: bf16 activations times 2- to 4-bit weights, against
dequantize() and an exact matmul, for every layout it takes; and where it must not be used."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import check, heavy_tailed, per_weight, tiny_model
from easyquant import QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.runtime import cpu_kernel as ck
from easyquant.runtime.nn import CPU_INT4_MAX_ROWS, EasyQuantLinear

pytestmark = [
    pytest.mark.skipif(not ck.supported(), reason="this torch has no CPU int4 kernel"),
    pytest.mark.filterwarnings("ignore:.*outliers"),
]


def kernel_group_of(qw) -> int | None:
    return ck.kernel_group(qw.bits, qw.shape, qw.group_size)


def weight(
    rows: int, cols: int, group: int | None, n_sigma: float | None = 2.5, seed: int = 0, bits: int = 4, asymmetric=False
):
    cfg = QuantConfig(
        bits=bits,
        group_size=group,
        n_sigma=n_sigma,
        solver="rtn",
        max_outlier_fraction=1.0,
        asymmetric=asymmetric,
        col_scale=False,  # the format's arithmetic; column scales: test_col_scale.py
    )
    return quantize_weight(heavy_tailed(rows, cols, seed=seed), cfg)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6).map(lambda r: 16 * r),
    blocks=st.integers(1, 12),
    group=st.sampled_from([None, 32, 64, 96, 128, 192, 256, 512, 1024]),
    batch=st.integers(0, 20),
    n_sigma=st.sampled_from([None, 2.0, 3.0]),
    bits=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 2**16),
    asymmetric=st.booleans(),
)
def test_matches_dequantize(rows, blocks, group, batch, n_sigma, bits, seed, asymmetric):
    """2, 3 and 4 bits; any width of whole 32-column blocks, per-channel or any group that is a
    whole number of kernel groups (a shorter last group included), with or without outliers,
    symmetric or asymmetric."""
    cols = 32 * blocks
    qw = weight(rows, cols, group, n_sigma, seed, bits, asymmetric)
    kernel_group = kernel_group_of(qw)
    assert kernel_group in ck.KERNEL_GROUPS and cols % kernel_group == 0 and qw.group_size % kernel_group == 0
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)).bfloat16()
    check(ck.matmul(x, ck.repack(qw)), x, qw, slack=zero_rounding(qw))


def zero_rounding(qw) -> torch.Tensor | None:
    """A 4-bit asymmetric weight's zero point reaches the kernel as ``s * (8 - z)`` in bf16: within
    2^-9 of it, on every weight of the group (2- and 3-bit ones are re-centred exactly)."""
    if not qw.asymmetric or qw.bits < 4:
        return None
    return per_weight((qw.scales.float() * (8 - qw.zeros.float())).abs() * 2**-8, qw.group_size, qw.shape[1])


def test_crowded_outlier_rows_and_bias():
    """Rows holding many outliers (summed in fp32, added once), a bias, leading dimensions and a
    non-contiguous input."""
    qw = weight(48, 256, 64, n_sigma=1.0)
    counts = torch.diff(qw.row_pointers())
    assert counts.max() > 40
    bias = torch.randn(48)
    w = ck.repack(qw)
    x = torch.randn(2, 3, 256).bfloat16()
    y = ck.matmul(x, w, bias)
    assert y.shape == (2, 3, 48)
    check(y.reshape(6, 48), x.reshape(6, 256), qw, bias)
    xt = torch.randn(256, 5).bfloat16().T
    check(ck.matmul(xt, w), xt, qw)


def test_layouts_it_cannot_take():
    assert kernel_group_of(weight(40, 64, None)) is None  # rows not a multiple of 16
    assert kernel_group_of(weight(32, 80, None)) is None  # columns not whole 32-column blocks
    assert kernel_group_of(weight(32, 96, 48)) is None  # groups not whole kernel groups
    assert kernel_group_of(weight(32, 64, None, bits=5)) is None
    with pytest.raises(ValueError, match="cannot take a 5-bit"):
        ck.repack(weight(32, 64, None, bits=5))


def test_linear_uses_it_for_short_bf16_inputs_only():
    qw = weight(64, 128, 32)
    layer = EasyQuantLinear.from_quantized(qw, torch.randn(64))
    short = torch.randn(CPU_INT4_MAX_ROWS, 128).bfloat16()
    assert layer.path(short) == "int4"
    assert layer.path(torch.randn(CPU_INT4_MAX_ROWS + 1, 128).bfloat16()) == "torch"
    assert layer.path(short.float()) == layer.path(short.half()) == "torch"  # exact dtypes stay exact
    assert EasyQuantLinear.from_quantized(weight(64, 128, 32, bits=5)).path(short) == "torch"
    check(layer(short), short, qw, layer.bias)
    layer.backend = "torch"
    assert layer.path(short) == "torch"


def test_linear_follows_its_weights_and_casts():
    """The kernel's copy is remade when a quantized tensor changes in place (load_state_dict),
    and dropped by .to(); .to(dtype) moves the compute dtype and the bias but never rounds the
    stored fp16 scales and outliers."""
    q1 = weight(32, 64, None, seed=1)
    q2 = dataclasses.replace(q1, scales=-2 * q1.scales, outlier_values=-q1.outlier_values)
    layer = EasyQuantLinear.from_quantized(q1, torch.randn(32)).to(torch.bfloat16)
    assert layer.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.scales.dtype == layer.outlier_values.dtype == torch.float16
    assert torch.equal(layer.scales, q1.scales) and torch.equal(layer.outlier_values, q1.outlier_values)
    x = torch.randn(3, 64).bfloat16()
    check(layer(x), x, q1, layer.bias)
    first = layer.int4_weight()
    assert layer.int4_weight() is first
    layer.load_state_dict(EasyQuantLinear.from_quantized(q2, layer.bias).state_dict())  # in place
    check(layer(x), x, q2, layer.bias)
    layer.float()
    assert layer._int4 is None and layer.dtype == torch.float32 and layer.scales.dtype == torch.float16


def test_bf16_checkpoint_runs_the_int4_kernel_by_default(tmp_path):
    """A bf16 model quantizes into a checkpoint that from_pretrained loads in bf16 with no dtype
    argument, and on the CPU every quantized layer then takes the int4 kernel: the logits agree
    with the dequantizing path to bf16 rounding, and it generates."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src, dtype=torch.bfloat16)
    quantize_model(src, out, QuantConfig(bits=4, n_sigma=2.5), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    layers = [m for m in model.modules() if isinstance(m, EasyQuantLinear)]
    x = torch.randint(0, 128, (2, 9))
    assert model.dtype == torch.bfloat16 and all(
        m.path(torch.zeros(18, m.in_features).bfloat16()) == "int4" for m in layers
    )
    with torch.no_grad():
        fast = model(x).logits.float()
        EasyQuantLinear.backend = "torch"
        try:
            ref = model(x).logits.float()
        finally:
            EasyQuantLinear.backend = "auto"
    assert all(m._int4 is not None for m in layers)
    assert (fast - ref).norm() < 0.02 * ref.norm()  # bf16 rounding through two layers: about 0.6% here
    assert model.generate(x[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 8)
