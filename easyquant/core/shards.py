"""Cutting and joining quantized weights without dequantizing them: what tensor parallelism
and fused layers (vLLM's ``qkv_proj``, ``gate_up_proj``) need.

- :func:`take_rows`: output rows ``[start, stop)`` (a column-parallel shard): packed rows,
  scale rows and the CSR outliers of those rows, row pointers rebased.
- :func:`take_cols`: input columns ``[start, stop)`` (a row-parallel shard): the packed codes
  of those columns (``start`` on a packing boundary of 8 codes), the scale groups they span
  (``start`` on a group boundary unless per channel) and the outliers in those columns,
  renumbered.
- :func:`stack_rows`: weights of equal width and format, one above the other (q, k, v into
  one): everything concatenated, row pointers offset by the outliers before them; dual-axis
  weights only with equal column scales, which they then share.

Each result equals slicing or concatenating the dequantized weights (tests check it).
"""

from __future__ import annotations

import torch

from ..errors import EasyQuantError
from .packing import pack, unpack
from .qweight import QuantizedWeight, compact_rowptr, index_dtype, rowptr_from_counts

PACK_CODES = 8  # codes per packed unit: 8 codes take ``bits`` bytes


def take_rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    rows, cols = qw.shape
    if not 0 <= start < stop <= rows:
        raise EasyQuantError(f"rows [{start}, {stop}) are outside a weight of {rows} rows")
    ptr = qw.row_pointers()
    lo, hi = int(ptr[start]), int(ptr[stop])
    return QuantizedWeight(
        qw.packed[start:stop],
        qw.scales[start:stop],
        compact_rowptr(ptr[start : stop + 1] - lo),
        qw.outlier_cols[lo:hi],
        qw.outlier_values[lo:hi],
        qw.bits,
        qw.group_size,
        (stop - start, cols),
        qw.dtype,
        None if qw.zeros is None else qw.zeros[start:stop],
        qw.col_scales,
        qw.zero_shift,
    )


def take_cols(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    rows, cols = qw.shape
    if not 0 <= start < stop <= cols:
        raise EasyQuantError(f"columns [{start}, {stop}) are outside a weight of {cols} columns")
    per_channel = qw.group_size >= cols
    if start % PACK_CODES or (not per_channel and (start % qw.group_size or (stop < cols and stop % qw.group_size))):
        raise EasyQuantError(
            f"columns [{start}, {stop}) of a {rows}x{cols} weight with groups of {qw.group_size}: a shard must "
            f"start on a multiple of {PACK_CODES} and cut on group boundaries"
        )
    codes = unpack(qw.packed, qw.bits, cols)[:, start:stop]
    width = stop - start
    if per_channel:
        scales, zeros, group = qw.scales, qw.zeros, width
    else:
        span = slice(start // qw.group_size, -(-stop // qw.group_size))
        scales, zeros, group = qw.scales[:, span], None if qw.zeros is None else qw.zeros[:, span], qw.group_size
    r, c = qw.outlier_rows(), qw.outlier_cols.long()
    keep = (c >= start) & (c < stop)
    counts = torch.bincount(r[keep], minlength=rows)
    rowptr = rowptr_from_counts(counts)
    col_idx, vals = (c[keep] - start).to(index_dtype(width)), qw.outlier_values[keep]
    return QuantizedWeight(
        pack(codes, qw.bits), scales.contiguous(), rowptr, col_idx, vals, qw.bits, min(group, width), (rows, width),
        qw.dtype, None if zeros is None else zeros.contiguous(),
        None if qw.col_scales is None else qw.col_scales[start:stop].contiguous(), qw.zero_shift,
    )  # fmt: skip


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    first = parts[0]
    cols = first.shape[1]
    for p in parts:
        if (p.shape[1], p.bits, p.group_size, p.scales.shape[1], p.asymmetric, p.zero_shift) != (
            cols, first.bits, first.group_size, first.scales.shape[1], first.asymmetric, first.zero_shift
        ):  # fmt: skip
            raise EasyQuantError(
                f"cannot stack a {p.shape} weight at {p.bits} bits, groups of {p.group_size}"
                f"{', asymmetric' * p.asymmetric} under a {first.shape} one at {first.bits} bits, groups of "
                f"{first.group_size}{', asymmetric' * first.asymmetric}"
            )
        if (p.col_scales is None) != (first.col_scales is None) or (
            p.col_scales is not None and not torch.equal(p.col_scales, first.col_scales)
        ):
            raise EasyQuantError(
                "cannot stack weights with different column scales (dual-axis weights share an input only if their "
                "column scales are equal)"
            )
    offsets = torch.tensor([0] + [p.outlier_count for p in parts]).cumsum(0)
    rowptr = torch.cat(
        [parts[0].row_pointers()[:1]]
        + [p.row_pointers()[1:] + int(off) for p, off in zip(parts, offsets[:-1], strict=True)]
    )
    return QuantizedWeight(
        torch.cat([p.packed for p in parts]),
        torch.cat([p.scales for p in parts]),
        compact_rowptr(rowptr),
        torch.cat([p.outlier_cols.to(index_dtype(cols)) for p in parts]),
        torch.cat([p.outlier_values for p in parts]),
        first.bits,
        first.group_size,
        (sum(p.shape[0] for p in parts), cols),
        first.dtype,
        torch.cat([p.zeros for p in parts]) if first.asymmetric else None,
        first.col_scales,
        first.zero_shift,
    )
