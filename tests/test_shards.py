"""Row and column shards and row stacks of quantized weights equal the same cuts of the
dequantized weights: what tensor parallelism (tp=2, 4 simulated by slicing) and vLLM's fused
qkv/gate_up layers rely on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from easyquant import QuantConfig, quantize_weight
from easyquant.core.shards import stack_rows, take_cols, take_rows
from easyquant.errors import EasyQuantError


def _weight(
    seed: int, rows: int, cols: int, bits: int, group: int | None, n_sigma: float | None, asym=False, col=False
):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 0.02] *= 8  # heavy tail: outliers in every shard
    return quantize_weight(w, QuantConfig(bits=bits, group_size=group, n_sigma=n_sigma, asymmetric=asym, col_scale=col))


configs = st.tuples(
    st.integers(0, 10_000), st.sampled_from([2, 3, 4, 8]), st.sampled_from([None, 16, 32]),
    st.sampled_from([None, 2.0, 3.0]), st.sampled_from([1, 2, 4]), st.booleans(), st.booleans(),
)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(configs)
def test_tensor_parallel_shards_equal_dense_slices(case) -> None:
    seed, bits, group, n_sigma, tp, asym, col = case
    rows, cols = 24, 128
    qw = _weight(seed, rows, cols, bits, group, n_sigma, asym, col)
    dense = qw.dequantize(torch.float32)
    for rank in range(tp):
        r0, r1 = rank * rows // tp, (rank + 1) * rows // tp
        c0, c1 = rank * cols // tp, (rank + 1) * cols // tp
        by_rows, by_cols = take_rows(qw, r0, r1), take_cols(qw, c0, c1)
        by_rows.check("rows"), by_cols.check("cols")
        assert torch.equal(by_rows.dequantize(torch.float32), dense[r0:r1])
        assert torch.equal(by_cols.dequantize(torch.float32), dense[:, c0:c1])
    parts = [take_rows(qw, i * rows // tp, (i + 1) * rows // tp) for i in range(tp)]
    assert torch.equal(stack_rows(parts).dequantize(torch.float32), dense)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 32]), st.booleans())
def test_fused_qkv_is_the_stack_of_its_parts(seed, group, asym) -> None:
    q, k, v = (_weight(seed + i, rows, 64, 4, group, 2.5, asym) for i, rows in enumerate((32, 8, 8)))
    fused = stack_rows([q, k, v])
    fused.check("qkv")
    want = torch.cat([q.dequantize(torch.float32), k.dequantize(torch.float32), v.dequantize(torch.float32)])
    assert torch.equal(fused.dequantize(torch.float32), want)
    assert fused.outlier_count == q.outlier_count + k.outlier_count + v.outlier_count


def test_column_shards_must_cut_on_group_and_packing_boundaries() -> None:
    qw = _weight(0, 8, 128, 4, 32, 3.0)
    with pytest.raises(EasyQuantError, match="group boundaries"):
        take_cols(qw, 16, 128)
    with pytest.raises(EasyQuantError, match="multiple of 8"):
        take_cols(_weight(0, 8, 128, 4, None, 3.0), 4, 64)
    with pytest.raises(EasyQuantError, match="outside"):
        take_rows(qw, 4, 9)
    with pytest.raises(EasyQuantError, match="cannot stack"):
        stack_rows([qw, _weight(0, 8, 64, 4, 32, 3.0)])
    with pytest.raises(EasyQuantError, match="asymmetric"):
        stack_rows([qw, _weight(1, 8, 128, 4, 32, 3.0, asym=True)])
    dual = _weight(0, 8, 128, 4, 32, 3.0, col=True)
    for other in (qw, _weight(1, 8, 128, 4, 32, 3.0, col=True)):  # none, or column scales of its own
        with pytest.raises(EasyQuantError, match="different column scales"):
            stack_rows([dual, other])
