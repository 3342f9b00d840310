"""The Triton kernels as torch custom ops: ``torch.ops.easyquant.qmatmul`` and ``.dequantize``.

``torch.compile`` cannot trace Triton's launcher or the host-side planning of
:mod:`easyquant.runtime.kernel`; as opaque ops with shape-only fakes, an
:class:`~easyquant.runtime.nn.EasyQuantLinear` compiles with ``fullgraph=True``, and so can run under
CUDA graphs (``mode="reduce-overhead"``), which removes the per-linear launch cost that
dominates decode in eager mode. Eager calls go straight to the kernel instead: torch's
dispatcher costs about 13 us a call on the host, as much as the rest of the work.

:func:`outlier_mode` picks the outlier path of each weight (:func:`easyquant.runtime.kernel.outlier_mode`)
on its first call and remembers it by the address of the row pointers: that reads them (a
device sync), which must stay out of traced and captured code. A stale entry, after memory
is reused by another weight, can only cost speed: both paths give the same result.
"""

from __future__ import annotations

import torch

from ..core.qweight import QuantizedWeight
from . import kernel

_outlier_modes: dict[tuple[int, str, int], str] = {}


def outlier_mode(qw: QuantizedWeight) -> str:
    """:func:`easyquant.runtime.kernel.outlier_mode`, decided once per weight (by its row pointers' address)."""
    key = (qw.outlier_rowptr.data_ptr(), str(qw.outlier_rowptr.device), qw.outlier_count)
    mode = _outlier_modes.get(key)
    if mode is None:
        mode = _outlier_modes[key] = kernel.outlier_mode(qw)
    return mode


def _weight(packed, scales, rowptr, cols, values, zeros, col_scales, bits, group_size, out_features, in_features,
            dtype, zero_shift):  # fmt: skip
    shape = (out_features, in_features)
    return QuantizedWeight(
        packed, scales, rowptr, cols, values, bits, group_size, shape, dtype, zeros, col_scales, zero_shift
    )


def _qmatmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    rowptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    zeros: torch.Tensor | None,
    col_scales: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    zero_shift: int = 0,
) -> torch.Tensor:
    """``x @ W.T + bias`` through :func:`easyquant.runtime.kernel.qmatmul`."""
    qw = _weight(
        packed, scales, rowptr, cols, values, zeros, col_scales, bits, group_size, out_features, x.shape[-1], x.dtype,
        zero_shift,
    )  # fmt: skip
    return kernel.qmatmul(x, qw, bias, outliers=outlier_mode(qw))


qmatmul = torch.library.custom_op("easyquant::qmatmul", _qmatmul, mutates_args=())


@qmatmul.register_fake
def _(x, packed, scales, rowptr, cols, values, zeros, col_scales, bias, bits, group_size, out_features, zero_shift=0):
    return x.new_empty((*x.shape[:-1], out_features))


def _dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    rowptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    zeros: torch.Tensor | None,
    col_scales: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    zero_shift: int = 0,
) -> torch.Tensor:
    """The dense weight, through :func:`easyquant.runtime.kernel.dequantize`."""
    qw = _weight(
        packed, scales, rowptr, cols, values, zeros, col_scales, bits, group_size, packed.shape[0], in_features, dtype,
        zero_shift,
    )  # fmt: skip
    return kernel.dequantize(qw, dtype)


dequantize = torch.library.custom_op("easyquant::dequantize", _dequantize, mutates_args=())


@dequantize.register_fake
def _(packed, scales, rowptr, cols, values, zeros, col_scales, bits, group_size, in_features, dtype, zero_shift=0):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)
