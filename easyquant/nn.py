"""``EasyQuantLinear``: an ``nn.Linear`` whose weight is a :class:`QuantizedWeight`.

It holds the packed codes, scales and CSR outliers as (frozen) parameters named as in the
checkpoint, so a state dict loads straight into it. The forward pass is where the GPU
kernel plugs in; elsewhere it dequantizes on the fly into the activations' dtype, which
keeps memory at the packed size between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from .groups import group_count
from .packing import packed_cols
from .qweight import QuantizedWeight, index_dtype, rowptr_dtype

QUANTIZED_TENSORS = ("packed", "scales", "outlier_rowptr", "outlier_cols", "outlier_values")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class EasyQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        outliers: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, min(group_size, in_features), dtype
        kw = {"device": device}
        self.packed = _frozen(torch.zeros(out_features, packed_cols(in_features, bits), dtype=torch.uint8, **kw))
        self.scales = _frozen(
            torch.zeros(out_features, group_count(in_features, self.group_size), dtype=torch.float16, **kw)
        )
        self.outlier_rowptr = _frozen(torch.zeros(out_features + 1, dtype=rowptr_dtype(outliers), **kw))
        self.outlier_cols = _frozen(torch.zeros(outliers, dtype=index_dtype(in_features), **kw))
        self.outlier_values = _frozen(torch.zeros(outliers, dtype=torch.float16, **kw))
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> EasyQuantLinear:
        rows, cols = qw.shape
        mod = cls(cols, rows, bias is not None, qw.bits, qw.group_size, qw.outlier_count, qw.dtype, qw.packed.device)
        for name, t in qw.tensors().items():
            getattr(mod, name).data = t
        if bias is not None:
            mod.bias.data = bias.detach().to(qw.dtype)
        return mod

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            **{name: getattr(self, name).data for name in QUANTIZED_TENSORS},
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
            dtype=self.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, outliers={self.outlier_values.numel()}, bias={self.bias is not None}"
        )
