"""Triton matmul of activations with a :class:`QuantizedWeight`: packed codes plus CSR outliers.

``y = x @ W.T`` where ``W = scales * (codes + qmin)`` with the fp16 outliers written over it.
Because outlier positions hold the code of 0 (see :mod:`easyquant.qweight`), the product
splits exactly into a dense part and a sparse part:

- dense: each program owns a ``(BLOCK_M, BLOCK_N)`` tile of ``y``, streams the packed codes
  of its ``BLOCK_N`` weight rows ``BLOCK_K`` columns at a time, unpacks them in registers
  (two 4-bit codes per byte with an interleave, other widths by reading the one or two bytes
  each code straddles), applies per-row scales once after the reduction or per-group scales
  on the tile, and multiplies on the tensor cores (``tl.dot``; a broadcast-sum when the tile
  has fewer than 16 activation rows);
- sparse: the outliers of rows ``[n0, n0 + BLOCK_N)`` are one contiguous CSR segment. It is
  cut into chunks of ``BLOCK_NNZ``; each chunk gathers ``x[:, col]``, scales by the values
  and adds into the tile through a one-hot ``(BLOCK_NNZ, BLOCK_N)`` matrix of row membership.
  So a row's cost follows its own outlier count, never the longest row's; but a tile whose
  rows hold many outliers keeps its program busy longer. Real weights do crowd outliers into
  some rows, so where the busiest tile holds over ``BALANCE_ABOVE`` times the mean
  (:func:`outlier_mode`), the outliers go instead to a second, balanced kernel: every program
  takes the same number of them, finds their rows by bisecting the row pointers, and adds
  them atomically.

Split-K (``split_k > 1``) gives decode shapes enough programs to fill the GPU: programs
``pid_k = 0..split_k-1`` of a tile take every ``split_k``-th K block and every ``split_k``-th
outlier chunk, and add their partial tiles atomically into an fp32 buffer.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the tests check it against ``dequantize()`` and a plain matmul.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .errors import EasyQuantError
from .qweight import QuantizedWeight

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path in nn.py needs none of this
    triton = None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# "fused": each tile adds its own rows' outliers; "balanced": a second kernel gives every program
# the same number of outliers, whatever rows they fall on, and adds them atomically.
OUTLIER_MODES = ("fused", "balanced")
# Real weights crowd their outliers into some rows (RESULTS.md: up to 5x the mean per 64-row
# tile on SmolLM2); past this ratio a fused tile would keep its program busy that much longer.
BALANCE_ABOVE = 2.0


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``: Triton is installed and ``x`` is on a GPU
    (or the interpreter is on, for tests on the CPU)."""
    if triton is None or x.dtype not in ACTIVATION_DTYPES:
        return False
    return x.is_cuda or interpreting()


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters; :func:`default_config` picks them from the shape."""

    block_m: int
    block_n: int
    block_k: int
    block_nnz: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    outliers: str = "fused"  # or "balanced": see OUTLIER_MODES

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "block_nnz"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise EasyQuantError(f"KernelConfig.{name} must be a power of two, got {v}")
        if self.block_n < 16 or self.block_k < 16 or self.block_nnz < 16:
            raise EasyQuantError("KernelConfig: block_n, block_k and block_nnz must be at least 16")
        if self.split_k < 1:
            raise EasyQuantError(f"KernelConfig.split_k must be at least 1, got {self.split_k}")
        if self.outliers not in OUTLIER_MODES:
            raise EasyQuantError(f"KernelConfig.outliers must be one of {OUTLIER_MODES}, got {self.outliers!r}")


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises split-K


def tile_skew(qw: QuantizedWeight, block_n: int = 64) -> float:
    """Outliers in the busiest ``block_n``-row tile over the mean tile (1.0 with none).
    Reads the row pointers: a device sync."""
    if qw.outlier_count == 0:
        return 1.0
    ptr = qw.outlier_rowptr
    edges = torch.cat([ptr[::block_n], ptr[-1:]]) if (len(ptr) - 1) % block_n else ptr[::block_n]
    per_tile = torch.diff(edges.long()).float()
    return (per_tile.max() / per_tile.mean()).item()


def outlier_mode(qw: QuantizedWeight, block_n: int = 64) -> str:
    """``"balanced"`` when :func:`tile_skew` is over ``BALANCE_ABOVE``, else ``"fused"``.
    Decide once per weight, as :class:`~easyquant.nn.EasyQuantLinear` does."""
    return "balanced" if tile_skew(qw, block_n) > BALANCE_ABOVE else "fused"


@functools.cache  # called on every forward: keep it off the decode path's CPU time
def default_config(m: int, n: int, k: int, device: torch.device, outliers: str = "fused") -> KernelConfig:
    """Decode shapes (few rows): thin tiles and split-K until about two waves of programs;
    prefill shapes: square tensor-core tiles."""
    if m <= 8:
        block_m, block_n, block_k = (1 if m == 1 else 16), 64, 128
    elif m <= 32:
        block_m, block_n, block_k = 16 if m <= 16 else 32, 64, 128
    else:
        block_m, block_n, block_k = 64, 64, 64
    tiles = max(1, math.ceil(m / block_m) * math.ceil(n / block_n))
    split = max(1, min(2 * _multiprocessors(device) // tiles, math.ceil(k / block_k), 16))
    return KernelConfig(block_m, block_n, block_k, split_k=split, outliers=outliers)


if triton is not None:

    @triton.jit
    def _unpack_tile(packed_ptr, row_bytes, rn, k0, rk, n_mask, k_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """Unsigned codes ``(BLOCK_N, BLOCK_K)`` of rows ``rn`` and columns ``rk = k0 + arange`` (int32)."""
        row = packed_ptr + rn[:, None].to(tl.int64) * row_bytes
        if BITS == 4:
            # Two codes per byte, low nibble first: load each byte once and interleave.
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            half_mask = n_mask[:, None] & (rb < row_bytes)[None, :]
            byte = tl.load(row + rb[None, :], mask=half_mask, other=0).to(tl.int32)
            codes = tl.interleave(byte & 15, byte >> 4)
        else:
            bit = rk * BITS
            first = bit // 8
            mask = n_mask[:, None] & k_mask[None, :]
            word = tl.load(row + first[None, :], mask=mask, other=0).to(tl.int32)
            if 8 % BITS != 0:  # 3, 5, 6 and 7-bit codes may straddle two bytes
                second_mask = mask & (first + 1 < row_bytes)[None, :]
                word = word | (tl.load(row + first[None, :] + 1, mask=second_mask, other=0).to(tl.int32) << 8)
            codes = (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
        return codes

    @triton.jit
    def _qmatmul_kernel(
        x_ptr, y_ptr, packed_ptr, scales_ptr, rowptr_ptr, cols_ptr, vals_ptr,
        M, N, K, stride_xm, stride_ym, row_bytes, n_groups,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr,
        SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = rm < M, rn < N
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        qmin = -(1 << (BITS - 1))

        for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k0 = kb * BLOCK_K
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            x = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            codes = _unpack_tile(packed_ptr, row_bytes, rn, k0, rk, n_mask, k_mask, BITS, BLOCK_K)
            q = (codes + qmin).to(tl.float32)
            if not PER_ROW:
                s = tl.load(scales_ptr + rn[:, None] * n_groups + (rk // GROUP)[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
                q = q * s.to(tl.float32)
            w = q.to(x.dtype)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if PER_ROW:
            acc = acc * tl.load(scales_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

        if HAS_OUTLIERS:
            n0 = pid_n * BLOCK_N
            start = tl.load(rowptr_ptr + n0)
            end = tl.load(rowptr_ptr + tl.minimum(n0 + BLOCK_N, N))
            # Row of each outlier in the tile: the number of row ends at or before it.
            ends = tl.load(rowptr_ptr + rn + 1, mask=n_mask, other=end)
            local = tl.arange(0, BLOCK_N)
            for c in range(pid_k, tl.cdiv(end - start, BLOCK_NNZ), SPLIT_K):
                j = start + c * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
                j_mask = j < end
                col = tl.load(cols_ptr + j, mask=j_mask, other=0).to(tl.int32)
                val = tl.load(vals_ptr + j, mask=j_mask, other=0.0).to(tl.float32)
                row = tl.sum((ends[None, :] <= j[:, None]).to(tl.int32), axis=1)
                onehot = ((row[:, None] == local[None, :]) & j_mask[:, None]).to(tl.float32)
                xg = tl.load(x_rows + col[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
                contrib = xg.to(tl.float32) * val[None, :]
                if USE_DOT:
                    acc += tl.dot(contrib, onehot, input_precision="ieee")
                else:
                    acc += tl.sum(contrib[:, :, None] * onehot[None, :, :], axis=1)

        y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y, acc, mask=out_mask)
        else:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _outlier_kernel(
        x_ptr, y_ptr, rowptr_ptr, cols_ptr, vals_ptr, M, N, nnz, stride_xm, stride_ym,
        SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NNZ: tl.constexpr,
    ):  # fmt: skip
        """``y[:, row] += val * x[:, col]`` for outliers ``[pid * BLOCK_NNZ, ...)``, into fp32 ``y``."""
        j = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        j_mask, m_mask = j < nnz, rm < M
        # Each outlier's row: the last r with rowptr[r] <= j, by bisection (rowptr[lo] <= j < rowptr[hi]).
        lo = tl.zeros((BLOCK_NNZ,), dtype=tl.int32)
        hi = lo + N
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(rowptr_ptr + mid, mask=j_mask, other=0) <= j
            lo, hi = tl.where(go, mid, lo), tl.where(go, hi, mid)
        col = tl.load(cols_ptr + j, mask=j_mask, other=0).to(tl.int32)
        val = tl.load(vals_ptr + j, mask=j_mask, other=0.0).to(tl.float32)
        mask = m_mask[:, None] & j_mask[None, :]
        xg = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + col[None, :], mask=mask, other=0.0)
        y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + lo[None, :]
        tl.atomic_add(y, xg.to(tl.float32) * val[None, :], mask=mask)

    @triton.jit
    def _dequantize_kernel(
        w_ptr, packed_ptr, scales_ptr, N, K, row_bytes, n_groups,
        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        n_mask, k_mask = rn < N, rk < K
        mask = n_mask[:, None] & k_mask[None, :]
        codes = _unpack_tile(packed_ptr, row_bytes, rn, k0, rk, n_mask, k_mask, BITS, BLOCK_K)
        s = tl.load(scales_ptr + rn[:, None] * n_groups + (rk // GROUP)[None, :], mask=mask, other=0.0)
        w = (codes - (1 << (BITS - 1))).to(tl.float32) * s.to(tl.float32)
        tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _check_available(x: torch.Tensor) -> None:
    if not available(x):
        raise EasyQuantError(
            f"the Triton kernel needs Triton and a CUDA tensor (or TRITON_INTERPRET=1) with activations in "
            f"{[str(d) for d in ACTIVATION_DTYPES]}; got a {x.dtype} tensor on {x.device}"
        )


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``qw.dequantize(dtype)`` in one pass over the packed codes, with no int64 temporaries:
    for inputs too long for :func:`qmatmul`, whose weight is then multiplied by cuBLAS."""
    n, k = qw.shape
    w = torch.empty(n, k, dtype=dtype, device=qw.packed.device)
    _check_available(w)
    block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](w, qw.packed, qw.scales, n, k, qw.packed.shape[1], qw.scales.shape[1],
                             BITS=qw.bits, GROUP=qw.group_size, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip
    return qw.write_outliers(w)


def qmatmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    outliers: str = "fused",
) -> torch.Tensor:
    """``x @ qw.dequantize().T + bias`` without materialising the weight. ``x``: ``(..., in)``.
    ``config`` defaults to :func:`default_config` with the given ``outliers`` mode."""
    _check_available(x)
    n, k = qw.shape
    if x.shape[-1] != k:
        raise EasyQuantError(f"activations have {x.shape[-1]} features, the weight expects {k}")
    if qw.packed.device != x.device:
        raise EasyQuantError(f"activations are on {x.device}, the quantized weight on {qw.packed.device}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or default_config(m, n, k, x.device, outliers)
    balanced = cfg.outliers == "balanced" and qw.outlier_count > 0
    atomic = cfg.split_k > 1
    if atomic:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:  # fp32 when the outlier kernel adds into it afterwards
        y = torch.empty(m, n, dtype=torch.float32 if balanced else x.dtype, device=x.device)
    if m:
        has_outliers = qw.outlier_count > 0 and not balanced
        # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
        # there, dot the same bf16 values in fp32, which is what the GPU's bf16 MMA accumulates.
        interpreted_bf16 = x.dtype == torch.bfloat16 and not x.is_cuda
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
        _qmatmul_kernel[grid](
            x2, y, qw.packed, qw.scales, qw.outlier_rowptr, qw.outlier_cols, qw.outlier_values,
            m, n, k, x2.stride(0), y.stride(0), qw.packed.shape[1], qw.scales.shape[1],
            BITS=qw.bits, GROUP=qw.group_size, PER_ROW=qw.scales.shape[1] == 1, HAS_OUTLIERS=has_outliers,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_NNZ=cfg.block_nnz,
            SPLIT_K=cfg.split_k, ATOMIC=atomic, USE_DOT=cfg.block_m >= 16,
            PRECISION="ieee" if x.dtype == torch.float32 or interpreted_bf16 else "tf32",
            UPCAST=interpreted_bf16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if balanced:
            block_m = min(triton.next_power_of_2(m), 16)
            grid = (triton.cdiv(qw.outlier_count, cfg.block_nnz), triton.cdiv(m, block_m))
            _outlier_kernel[grid](
                x2, y, qw.outlier_rowptr, qw.outlier_cols, qw.outlier_values, m, n, qw.outlier_count,
                x2.stride(0), y.stride(0), SEARCH_STEPS=max(1, n.bit_length()), BLOCK_M=block_m,
                BLOCK_NNZ=cfg.block_nnz,
            )  # fmt: skip
    y = y.to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
