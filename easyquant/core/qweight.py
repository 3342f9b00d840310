"""The quantized-weight type: packed low-bit codes, fp16 scales and fp16 sparse outliers.

Memory layout of a ``(rows, cols)`` weight quantized at ``bits`` with groups of
``group_size`` columns (``group_size == cols`` for per-channel):

- ``packed``: uint8 ``(rows, ceil(cols / 8) * bits)``, the codes ``q - qmin`` (unsigned) of
  every weight, packed as :mod:`easyquant.core.packing` describes. Outlier positions hold the
  code of 0, so the dense part contributes nothing there.
- ``scales``: fp16 ``(rows, ceil(cols / group_size))``; the sign is part of the scale.
- ``zeros`` (asymmetric weights only, format 2): uint8, the scales' shape: the zero point,
  the code that stands for 0, in fixed point with ``zero_shift`` fractional bits (0: an
  integer zero point; format 5: ``8 - bits``, a fractional one in steps of ``2^-zero_shift``).
- ``col_scales`` (dual-axis weights only, format 3): fp16 ``(cols,)``, positive: a scale per
  input column that multiplies the dense part (:mod:`easyquant.core.sinkhorn`), not the outliers.
- outliers in CSR: ``outlier_rowptr`` ``(rows + 1,)`` in the narrowest type holding the outlier
  count (uint8 up to 255, int16 up to 32767, int32, int64 past 2^31), and empty ``(0,)`` when
  there are no outliers (format 6; formats 1-5 stored int32 ``(rows + 1,)`` always, which loads
  too: a weight without outliers paid 32 bits a row for nothing), ``outlier_cols`` in the
  narrowest type holding a column index (uint8 up to 256 columns,
  int16 up to 32768, else int32) ``(nnz,)``, ascending within a row, and
  ``outlier_values`` fp16 ``(nnz,)``.

The weight it stands for is ``scales[r, j // group_size] * (packed code + qmin)``, or
``scales * (packed code - zeros / 2^zero_shift)`` for an asymmetric weight, times ``col_scales[j]`` for a
dual-axis one, plus the outliers:
:meth:`QuantizedWeight.dequantize`. Outlier positions hold the code nearest 0, so the dense
part is 0 there and an outlier's stored value is the weight itself (under a fractional zero
point the dense part there is a fraction of a step, and the stored value the weight less it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..errors import EasyQuantError
from .grid import Grid
from .groups import group_count
from .packing import packed_cols, unpack


def index_dtype(cols: int) -> torch.dtype:
    """Narrowest integer dtype that holds every column index of a ``cols``-wide row."""
    if cols <= 256:
        return torch.uint8
    if cols <= 32768:
        return torch.int16
    return torch.int32


def rowptr_layout(rows: int, nnz: int, compact: bool = True) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the row pointers of ``nnz`` outliers over ``rows`` rows; ``compact=False``:
    as formats 1-5 stored them (int32, int64 past 2^31 outliers, ``rows + 1`` even with none)."""
    if not compact:
        return (rows + 1,), torch.int32 if nnz < 2**31 else torch.int64
    if nnz == 0:
        return (0,), torch.uint8
    dtype = next(t for t in (torch.uint8, torch.int16, torch.int32, torch.int64) if nnz <= torch.iinfo(t).max)
    return (rows + 1,), dtype


def storage_bytes(
    shape: tuple[int, int], bits: int, group_size: int, outliers: int, asymmetric: bool = False, col_scale: bool = False
) -> int:
    """What a weight of ``shape`` quantized so stores (its :attr:`QuantizedWeight.nbytes`),
    known before it is quantized: packed codes, fp16 scales (and uint8 zero points) per group,
    the compact CSR outliers, fp16 column scales."""
    rows, cols = shape
    groups = rows * group_count(cols, min(group_size, cols))
    (ptrs,), ptr_dtype = rowptr_layout(rows, outliers)
    return (
        rows * packed_cols(cols, bits)
        + groups * (2 + asymmetric)
        + ptrs * ptr_dtype.itemsize
        + outliers * (index_dtype(cols).itemsize + 2)
        + 2 * cols * col_scale
    )


def compact_rowptr(ptr: torch.Tensor) -> torch.Tensor:
    """Full row pointers ``(rows + 1,)`` of any integer type in the format's compact layout."""
    shape, dtype = rowptr_layout(len(ptr) - 1, int(ptr[-1]))
    return ptr.to(dtype) if shape[0] else ptr.new_zeros(0, dtype=dtype)


def rowptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Compact row pointers of a CSR matrix with ``counts[r]`` entries in row ``r``."""
    return compact_rowptr(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


def csr_from_mask(mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (row pointers, column indices, fp16 values) of the True entries of ``mask``."""
    cols = mask.shape[1]
    rowptr = rowptr_from_counts(mask.sum(dim=1))
    col_idx = mask.nonzero()[:, 1].to(index_dtype(cols))
    return rowptr, col_idx, values[mask].to(torch.float16)


@dataclass(frozen=True)
class QuantizedWeight:
    packed: torch.Tensor
    scales: torch.Tensor
    outlier_rowptr: torch.Tensor
    outlier_cols: torch.Tensor
    outlier_values: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype
    zeros: torch.Tensor | None = None
    col_scales: torch.Tensor | None = None
    zero_shift: int = 0

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if not (isinstance(self.zero_shift, int) and 0 <= self.zero_shift <= 8 - self.bits):
            raise EasyQuantError(f"zero_shift must be 0..{8 - self.bits} at {self.bits} bits, got {self.zero_shift!r}")
        expect = {
            "packed": (rows, packed_cols(cols, self.bits)),
            "scales": (rows, group_count(cols, self.group_size)),
            "outlier_rowptr": (rows + 1,) if self.outlier_rowptr.numel() or self.outlier_cols.numel() else (0,),
            "outlier_values": tuple(self.outlier_cols.shape),
        }
        if self.zeros is not None:
            expect["zeros"] = expect["scales"]
        if self.col_scales is not None:
            expect["col_scales"] = (cols,)
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise EasyQuantError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    def check(self, name: str) -> None:
        """Raise :class:`EasyQuantError`, naming ``name``, unless every tensor has the format's
        dtype, the scales and outliers are finite, and the CSR row pointers and columns stay
        inside the matrix: kernels index memory with them, so a damaged or hand-edited
        checkpoint must stop here."""
        dtypes = {
            "packed": (torch.uint8,),
            "scales": (torch.float16,),
            "outlier_rowptr": (torch.uint8, torch.int16, torch.int32, torch.int64),
            "outlier_cols": (torch.uint8, torch.int16, torch.int32),
            "outlier_values": (torch.float16,),
            "zeros": (torch.uint8,),
            "col_scales": (torch.float16,),
        }
        for field, t in self.tensors().items():
            if t.dtype not in dtypes[field]:
                raise EasyQuantError(f"{name}.{field} is {t.dtype}, expected {dtypes[field][0]}")
        if self.zeros is not None and bool((self.zeros > self.grid.top << self.zero_shift).any()):
            raise EasyQuantError(f"{name}.zeros holds zero points outside 0..{self.grid.top}")
        for field in ("scales", "outlier_values"):
            if not bool(torch.isfinite(getattr(self, field)).all()):
                raise EasyQuantError(f"{name}.{field} holds NaN or Inf")
        if self.col_scales is not None and not bool((torch.isfinite(self.col_scales) & (self.col_scales > 0)).all()):
            raise EasyQuantError(f"{name}.col_scales holds values that are not finite and positive")
        ptr, idx, cols = self.row_pointers(), self.outlier_cols.long(), self.shape[1]
        if ptr[0] != 0 or ptr[-1] != idx.numel() or bool((ptr.diff() < 0).any()):
            raise EasyQuantError(f"{name}.outlier_rowptr is not a valid CSR row pointer for {idx.numel()} outliers")
        if idx.numel() and not (0 <= idx.min() and idx.max() < cols):
            raise EasyQuantError(f"{name}.outlier_cols holds columns outside 0..{cols - 1}")
        if bool(((idx.diff() <= 0) & (self.outlier_rows().diff() == 0)).any()):
            raise EasyQuantError(f"{name}.outlier_cols is not strictly ascending within each row")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits)

    @property
    def outlier_count(self) -> int:
        return self.outlier_values.numel()

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_count / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Storage of everything the weight needs: codes, scales, outliers and their indices."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def codes(self) -> torch.Tensor:
        """Integer codes ``(rows, cols)`` on the weight's grid: signed int8 (0 at outliers) for a
        symmetric weight, unsigned uint8 for an asymmetric one."""
        codes = unpack(self.packed, self.bits, self.shape[1])
        return codes if self.asymmetric else codes.to(torch.int8) + self.grid.qmin

    @property
    def asymmetric(self) -> bool:
        return self.zeros is not None

    def zero_points(self) -> torch.Tensor:
        """The zero points as fp32 codes (``zeros / 2^zero_shift``); asymmetric weights only."""
        return self.zeros.float() * 2.0**-self.zero_shift

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = unpack(self.packed, self.bits, self.shape[1]).float()  # changed in place: one full-size buffer
        if self.asymmetric:
            self._per_group(w, self.zero_points(), torch.Tensor.sub_)
        else:
            w.add_(self.grid.qmin)
        self._per_group(w, self.scales, torch.Tensor.mul_)
        if self.col_scales is not None:
            w.mul_(self.col_scales.float())
        return self.add_outliers(w).to(dtype or self.dtype)

    def _per_group(self, w: torch.Tensor, t: torch.Tensor, op) -> None:
        """``op(w, t)`` in place with the per-group ``t`` spread over the group's columns."""
        rows, cols = self.shape
        if cols % self.group_size == 0:  # a broadcast, no repeated values
            op(w.view(rows, -1, self.group_size), t.float()[:, :, None])
        else:
            op(w, t.float().repeat_interleave(self.group_size, dim=1)[:, :cols])

    def add_outliers(self, w: torch.Tensor) -> torch.Tensor:
        """Add the outliers to the dense ``(rows, cols)`` weight ``w`` in place; returns ``w``."""
        if self.outlier_count:
            w.index_put_(
                (self.outlier_rows(), self.outlier_cols.long()), self.outlier_values.to(w.dtype), accumulate=True
            )
        return w

    def row_pointers(self) -> torch.Tensor:
        """The CSR row pointers as int64 ``(rows + 1,)``, also where the format leaves them out."""
        if self.outlier_rowptr.numel():
            return self.outlier_rowptr.long()
        return torch.zeros(self.shape[0] + 1, dtype=torch.long, device=self.outlier_rowptr.device)

    def outlier_rows(self) -> torch.Tensor:
        """The row of each outlier (the CSR row pointers expanded)."""
        ptr = self.row_pointers()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=ptr.device), ptr.diff())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a checkpoint holds)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})
