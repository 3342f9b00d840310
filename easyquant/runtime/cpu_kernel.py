"""2- to 4-bit weights times bf16 activations on the CPU, through torch's own int4 matmul.

Dequantizing a weight at every call costs 10 to 30 times the dense matmul at decode on a
CPU: it writes the whole weight in floating point before reading it again. PyTorch ships a
CPU kernel for exactly easyquant's 4-bit arithmetic (``aten._weight_int4pack_mm_for_cpu``:
unsigned codes, ``(code - 8) * scale + zero`` per group of 32 to 256 columns, bf16
activations, fp32 accumulation), which reads the codes and unpacks them in registers. A
signed code ``q`` of 4 bits or fewer is the kernel's ``q + 8`` with ``zero = 0``, exactly, so
only the layout changes (an asymmetric weight's ``s * (u - z)`` is the kernel's ``u - z + 8``
with zero 0 up to 3 bits, exactly; at 4 bits its ``u`` with ``zero = s * (8 - z)`` rounded
to bf16, within 2^-9 of it): :func:`repack` writes the codes once in the kernel's
layout (4 bits each, also for 2- and 3-bit weights) and repeats each scale over the kernel's
groups; outliers, which add to the dense part, are one fp32 sparse CSR matrix, multiplied by
torch's sparse kernel (MKL) and added once. A dual-axis weight's column scales multiply
the activations of the dense product (rounded to bf16 once), not the outliers'. The kernel
takes bf16 scales: an fp16 scale rounds to bf16 (a relative change below 2^-8, as every
weight's is when a dequantized weight is cast to bf16).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..core.packing import unpack
from ..core.qweight import QuantizedWeight

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes the kernel takes, largest first
ROW_MULTIPLE = 16  # out_features must be a multiple of this


@dataclass(frozen=True)
class Int4Weight:
    """A weight as 4-bit codes in the layout of torch's CPU int4 kernel, plus its outliers."""

    packed: torch.Tensor  # uint8, the kernel's own layout
    group: int
    scales_and_zeros: torch.Tensor  # bf16 (in_features / group, out_features, 2)
    outliers: torch.Tensor | None  # fp32 sparse CSR (out_features, in_features)
    col_scales: torch.Tensor | None = None  # fp32 (in_features,): the dense part takes x * col_scales


def supported() -> bool:
    """Whether this torch build has the CPU int4 kernel (torch 2.6 and later)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(bits: int, shape: tuple[int, int], group_size: int) -> int | None:
    """The kernel group size for a ``(rows, cols)`` weight: the largest that divides both ``cols``
    and the weight's own group size (so each kernel group lies inside one easyquant group);
    ``None`` where the kernel cannot take the weight."""
    rows, cols = shape
    if bits > 4 or rows % ROW_MULTIPLE or not supported():
        return None
    return next((g for g in KERNEL_GROUPS if cols % g == 0 and group_size % g == 0), None)


def repack(qw: QuantizedWeight) -> Int4Weight:
    """Rewrite ``qw`` for the kernel (once per weight; the copy takes 4 bits a weight)."""
    group = kernel_group(qw.bits, qw.shape, qw.group_size)
    if group is None:
        raise ValueError(
            f"the CPU int4 kernel cannot take a {qw.bits}-bit {qw.shape} weight in groups of {qw.group_size}"
        )
    cols = qw.shape[1]
    owner = torch.arange(0, cols, group) // qw.group_size  # the easyquant group of each kernel group
    codes = unpack(qw.packed, qw.bits, cols).to(torch.int32)
    scales = qw.scales[:, owner].t().to(torch.bfloat16).float()
    zeros = torch.zeros_like(scales)
    if qw.zeros is None:  # signed q is the kernel's q + 8 with zero 0
        codes += 8 + qw.grid.qmin
    elif qw.bits < 4 and not qw.zero_shift:  # u - z + 8 stays within 0..15: the kernel's code, zero 0, exactly
        codes += 8 - qw.zeros.int().repeat_interleave(qw.group_size, dim=1)[:, :cols]
    else:  # s * (u - z) is the kernel's (u - 8) * s + s * (8 - z), that zero rounded to bf16
        zeros = scales * (8 - qw.zero_points()[:, owner].t())
    outliers = None
    if qw.outlier_count:
        index = torch.int32 if qw.outlier_count < 2**31 else torch.int64
        csr = qw.outlier_rowptr.to(index), qw.outlier_cols.to(index), qw.outlier_values.float()
        with warnings.catch_warnings():  # "CSR support is in beta"; the invariant checks are wanted
            warnings.simplefilter("ignore", UserWarning)
            outliers = torch.sparse_csr_tensor(*csr, size=qw.shape, check_invariants=True)
    return Int4Weight(
        torch._convert_weight_to_int4pack_for_cpu(codes, 1),
        group,
        torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous(),
        outliers,
        None if qw.col_scales is None else qw.col_scales.float(),
    )


def matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for bf16 ``x`` of any leading shape."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xd = x2 if w.col_scales is None else (x2.float() * w.col_scales).to(x2.dtype)
    y = torch._weight_int4pack_mm_for_cpu(xd, w.packed, w.group, w.scales_and_zeros)
    if w.outliers is not None:
        y += (w.outliers @ x2.t().float()).t()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])
