"""Fractional zero points (format 5): the asymmetric grid's zero point in steps of ``2^-(8-bits)``,
still one byte. The solver (never worse than the integer zero point), the stored layout
(outliers as residuals, since code z no longer stands for exactly 0), every runtime, and the
checkpoint path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import easyquant  # noqa: F401  (registers the loader)
from conftest import claim_format, heavy_tailed, loads_like_memory, module_matches, per_weight
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.format import FORMAT_VERSION
from easyquant.core.grid import Grid
from easyquant.core.groups import to_groups
from easyquant.core.objective import Objective
from easyquant.core.qweight import QuantizedWeight
from easyquant.core.shards import stack_rows, take_cols, take_rows
from easyquant.core.solvers import AffineSearch
from easyquant.runtime.kernel import available, dequantize, qmatmul
from easyquant.runtime.nn import EasyQuantLinear

FRACTIONAL = QuantConfig(group_size=64, n_sigma=2.5, asymmetric=True, fractional_zero=True, col_scale=False)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 7), seed=st.integers(0, 2**16), p=st.sampled_from([2.0, 3.0]), off=st.floats(0, 0.03))
def test_fractional_zero_is_on_its_steps_and_never_worse_than_the_integer_one(bits, seed, p, off):
    w = to_groups(heavy_tailed(16, 128, seed=seed) + off, 32)
    c = torch.ones_like(w)
    grid, obj = Grid(bits), Objective(p=p)
    whole = obj.affine_loss(w, c, *AffineSearch(obj).solve(w, c, grid), grid)
    shift = 8 - bits
    s, z = AffineSearch(obj, zero_shift=shift).solve(w, c, grid)
    stored = z * 2**shift
    assert torch.equal(s, s.half().float()) and torch.equal(stored, stored.round())
    assert z.min() >= 0 and z.max() <= grid.top
    assert torch.all(obj.affine_loss(w, c, s, z, grid) <= whole)


def test_fractional_zero_lowers_the_error_of_weights_on_a_shifted_grid():
    """Weights on another 4-bit grid whose zero sits 3/8 of a code off the integers (as in a
    re-quantized GGUF): the fractional zero point lines the grids up, the integer one cannot."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 256), generator=g).float()
    w = (codes - 7.375) * 0.01 + 1e-4 * torch.randn(64, 256, generator=g)
    cfg = QuantConfig(bits=4, group_size=64, n_sigma=None, asymmetric=True, col_scale=False)
    whole = (quantize_weight(w, cfg).dequantize(torch.float32) - w).norm()
    frac = (quantize_weight(w, replace(cfg, fractional_zero=True)).dequantize(torch.float32) - w).norm()
    assert frac < 0.35 * whole


@pytest.mark.filterwarnings("ignore:.*outliers")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("col_scale", [False, True])
def test_layout_and_outliers_as_residuals(bits, col_scale):
    w = heavy_tailed(40, 192, seed=bits) + 0.01
    qw = quantize_weight(w, replace(FRACTIONAL, bits=bits, col_scale=col_scale, max_outlier_fraction=1.0))
    qw.check("w")
    assert qw.zero_shift == 8 - bits and qw.zeros.dtype == torch.uint8
    assert int(qw.zeros.max()) <= Grid(bits).top << qw.zero_shift
    s, z = per_weight(qw.scales, 64, 192), per_weight(qw.zero_points(), 64, 192)
    t = torch.ones(192) if qw.col_scales is None else qw.col_scales.float()
    u = qw.codes().float()
    deq = qw.dequantize(torch.float32)
    outlier = torch.zeros_like(w, dtype=torch.bool)
    outlier[qw.outlier_rows(), qw.outlier_cols.long()] = True
    assert outlier.any()
    assert torch.equal(deq[~outlier], (s * (u - z) * t)[~outlier])
    assert torch.equal(u[outlier], z[outlier].round())  # the code nearest the zero point
    # the stored value makes up the dense part's remainder there: the outlier comes back to fp16
    torch.testing.assert_close(deq[outlier], w[outlier], rtol=2**-10, atol=1e-6)


def test_settings_and_tensors_it_refuses():
    with pytest.raises(EasyQuantError, match="fractional_zero needs asymmetric"):
        QuantConfig(fractional_zero=True)
    with pytest.raises(EasyQuantError, match="fractional_zero needs asymmetric"):
        QuantConfig(asymmetric=True, fractional_zero=True, solver="rtn")
    qw = quantize_weight(heavy_tailed(8, 64), replace(FRACTIONAL, n_sigma=None))
    with pytest.raises(EasyQuantError, match="zero_shift must be 0..4 at 4 bits"):
        replace(qw, zero_shift=5)
    bad = replace(qw, zeros=torch.full_like(qw.zeros, 241))  # 241 / 16 > 15
    with pytest.raises(EasyQuantError, match="w.zeros holds zero points outside 0..15"):
        bad.check("w")


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtimes_agree(bits, dtype):
    """The torch path, the CPU int4 kernel (bf16, which takes the zero point as its float
    offset), the module and the Triton kernels all compute the stored weight's product."""
    qw = quantize_weight(heavy_tailed(64, 256, seed=2) + 0.01, replace(FRACTIONAL, bits=bits, col_scale=True))
    lin = module_matches(qw, dtype)
    x = torch.randn(3, 256, dtype=dtype)
    assert f"zero_shift={8 - bits}" in repr(lin)
    if available(x):
        torch.testing.assert_close(dequantize(qw, torch.float32), qw.dequantize(torch.float32), rtol=0, atol=0)
        xf = x.float()
        torch.testing.assert_close(qmatmul(xf, qw).double(), xf.double() @ qw.dequantize(torch.float32).double().T,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_shards_keep_the_zero_shift():
    qw = quantize_weight(heavy_tailed(32, 128, seed=4) + 0.01, FRACTIONAL)
    parts = [take_rows(qw, 0, 16), take_rows(qw, 16, 32)]
    assert all(p.zero_shift == 4 for p in parts)
    assert torch.equal(stack_rows(parts).dequantize(), qw.dequantize())
    assert torch.equal(take_cols(qw, 64, 128).dequantize(), qw.dequantize()[:, 64:])
    integer = replace(parts[1], zeros=parts[1].zeros >> 4, zero_shift=0)
    with pytest.raises(EasyQuantError, match="cannot stack"):
        stack_rows([parts[0], integer])


def test_checkpoint_is_format_6_and_loads_with_the_in_memory_logits(tmp_path):
    qc, shard, _, _ = loads_like_memory(tmp_path, replace(FRACTIONAL, group_size=32))
    assert qc["fractional_zero"] is True and qc["format_version"] == FORMAT_VERSION
    model = transformers.AutoModelForCausalLM.from_pretrained(shard.parent)
    lin = next(m for m in model.modules() if isinstance(m, EasyQuantLinear))
    assert lin.zero_shift == 4 and isinstance(lin.quantized_weight(), QuantizedWeight)
    claim_format(shard.parent, 4)  # what an older writer could not have made
    with pytest.raises(EasyQuantError, match="these settings need format_version 5"):
        transformers.AutoModelForCausalLM.from_pretrained(shard.parent)
