"""Triton matmul of activations with a :class:`QuantizedWeight`: packed codes plus CSR outliers.

``y = x @ W.T`` where ``W = scales * (codes + qmin)`` (asymmetric weights:
``scales * (codes - zeros / 2^zero_shift)``) with the fp16 outliers written over it. Because outlier
positions hold the code of 0 (see :mod:`easyquant.qweight`), the product splits exactly into
a dense part and a sparse part:

- dense: each program owns a ``(BLOCK_M, BLOCK_N)`` tile of ``y``, streams the packed codes
  of its ``BLOCK_N`` weight rows ``BLOCK_K`` columns at a time, unpacks them in registers
  (each packed byte, or 32-bit word for widths that do not divide 8, loaded once and its
  codes spread into columns by interleaves), applies per-row scales once after the reduction or per-group scales
  on the tile, and multiplies on the tensor cores (``tl.dot``); a one-row tile (decode) instead
  multiply-adds elementwise into a ``(BLOCK_N, BLOCK_K)`` partial that is summed over K once,
  after the loop, so the loop has no cross-thread reduction;
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

Host side: :func:`plan_qmatmul` describes the launches (:class:`Launch`: kernel, grid,
arguments, constants) and :func:`qmatmul` runs them; :mod:`easyquant.kernel_aot` compiles the
same descriptions for a GPU that is not there. Runs on CUDA, and on the CPU under
``TRITON_INTERPRET=1`` (set before this module is imported), which is how the tests check it
against ``dequantize()`` and a plain matmul.
"""

from __future__ import annotations

import functools
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


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``: Triton is installed and ``x`` is on a GPU
    (or the interpreter is on, for tests on the CPU)."""
    if triton is None or x.dtype not in ACTIVATION_DTYPES:
        return False
    return x.is_cuda or INTERPRETED


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
        if 1 < self.block_m < 16:  # tensor-core tiles need 16 rows; one row takes the GEMV path
            raise EasyQuantError(f"KernelConfig.block_m must be 1 or at least 16, got {self.block_m}")
        if self.split_k < 1:
            raise EasyQuantError(f"KernelConfig.split_k must be at least 1, got {self.split_k}")
        if self.outliers not in OUTLIER_MODES:
            raise EasyQuantError(f"KernelConfig.outliers must be one of {OUTLIER_MODES}, got {self.outliers!r}")

    def __str__(self) -> str:
        return (f"m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} "
                f"st{self.num_stages}")  # fmt: skip


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors, which :func:`default_config` sizes split-K for."""
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


def _cdiv(a: int, b: int) -> int:  # triton.cdiv is a jit function: 2.5 us a call from the host
    return -(-a // b)


def fit_block_k(block_k: int, group: int) -> int:
    """``block_k``, or the power-of-two ``group`` (at least 16) when smaller: then every K block
    lies inside one scale group and loads one scale per row instead of one per element."""
    if 16 <= group < block_k and group & (group - 1) == 0:
        return group
    return block_k


@functools.cache  # called on every forward: keep it off the decode path's CPU time
def default_config(m: int, n: int, k: int, sms: int, outliers: str = "fused", group: int = 0) -> KernelConfig:
    """Decode shapes (few rows): thin tiles and split-K until about two waves of programs on
    ``sms`` multiprocessors; prefill shapes: square tensor-core tiles. K blocks shrink to fit
    inside one scale group of ``group`` columns (a weight's ``group_size``; 0: no limit).

    The shapes follow what the compiler makes of them for sm_90 (bench/results/compiled.md):
    one-row tiles of 32 x 256 with 64 codes per thread (4 warps; 2 when groups cut K to 128)
    are software-pipelined with 128-bit async copies and need almost no warp shuffles, where
    64 x 128 tiles spent hundreds; tensor-core tiles take outliers 16 at a time (32 spilled).
    GPU timings are to confirm them: bench/tune.py."""
    if m == 1:
        block_m, block_n, block_k = 1, 32, 256
    elif m <= 32:
        block_m, block_n, block_k = 16 if m <= 16 else 32, 64, 128
    else:
        block_m, block_n, block_k = 64, 64, 64
    block_k = fit_block_k(block_k, group)
    tiles = max(1, _cdiv(m, block_m) * _cdiv(n, block_n))
    split = max(1, min(2 * sms // tiles, _cdiv(k, block_k), 16))
    if block_m == 1:  # 64 codes per thread
        warps = max(1, block_n * block_k // 2048)
        return KernelConfig(1, block_n, block_k, 32, split, num_warps=warps, outliers=outliers)
    return KernelConfig(block_m, block_n, block_k, 16, split, outliers=outliers)


if triton is not None:

    @triton.jit
    def _pick(w0, w1, w2, w3, w4, w5, w6, i: tl.constexpr):
        """Word ``i`` of a group held as separate planes (chosen at compile time)."""
        if i == 0:
            w = w0
        else:
            w = _pick(w1, w2, w3, w4, w5, w6, w6, i - 1)
        return w

    @triton.jit
    def _code(w0, w1, w2, w3, w4, w5, w6, j: tl.constexpr, BITS: tl.constexpr, WORD_BITS: tl.constexpr):
        """Code ``j`` of a group of codes packed lowest bits first into words ``w0, w1, ...`` of
        ``WORD_BITS`` unsigned bits, joining the two words it straddles; int32."""
        lo = _pick(w0, w1, w2, w3, w4, w5, w6, j * BITS // WORD_BITS) >> (j * BITS % WORD_BITS)
        if j * BITS % WORD_BITS + BITS > WORD_BITS:
            hi = _pick(w0, w1, w2, w3, w4, w5, w6, j * BITS // WORD_BITS + 1)
            lo = lo | (hi << (WORD_BITS - j * BITS % WORD_BITS))
        return (lo & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _spread(w0, w1, w2, w3, w4, w5, w6, BITS: tl.constexpr, WORD_BITS: tl.constexpr,
                FIRST: tl.constexpr, STEP: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
        """Codes ``FIRST, FIRST + STEP, ...`` (``COUNT`` of them) of every group, as consecutive
        columns: each level interleaves the even-numbered codes with the odd-numbered ones."""
        if COUNT == 1:
            codes = _code(w0, w1, w2, w3, w4, w5, w6, FIRST, BITS, WORD_BITS)
        else:
            codes = tl.interleave(
                _spread(w0, w1, w2, w3, w4, w5, w6, BITS, WORD_BITS, FIRST, 2 * STEP, COUNT // 2),
                _spread(w0, w1, w2, w3, w4, w5, w6, BITS, WORD_BITS, FIRST + STEP, 2 * STEP, COUNT // 2),
            )
        return codes

    @triton.jit
    def _unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                     WORDS: tl.constexpr):  # fmt: skip
        """Unsigned codes ``(BLOCK_N, BLOCK_K)`` of rows ``rn``, columns ``k0 + arange(BLOCK_K)`` (int32).

        Every packed byte is loaded once (:mod:`easyquant.packing`: 8 codes to every ``BITS``
        bytes) and its codes spread into columns with interleaves. Widths that divide 8 load the
        bytes as one contiguous, vectorisable tile. The others, with ``WORDS`` (``packed_ptr``
        viewed as int32, rows 4-byte aligned), load each group of 32 codes as ``BITS`` strided
        planes of 32-bit words, which asynchronous copies can prefetch; without, as ``BITS``
        planes of bytes joined into one word per 8 codes.
        """
        row = packed_ptr + rn[:, None].to(tl.int64) * row_stride
        if 8 % BITS == 0:
            rb = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
            w = tl.load(row + rb[None, :], mask=n_mask[:, None] & (rb < row_stride)[None, :], other=0).to(tl.int32)
            codes = _spread(w, w, w, w, w, w, w, BITS, 8, 0, 1, 8 // BITS)
        elif WORDS:
            wi = (k0 // 32 + tl.arange(0, BLOCK_K // 32)) * BITS
            mask = n_mask[:, None] & (wi < row_stride)[None, :]
            w0 = tl.load(row + wi[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            w1 = tl.load(row + (wi + 1)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(row + (wi + 2)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            w3, w4, w5, w6 = w0, w0, w0, w0
            if BITS > 3:
                w3 = tl.load(row + (wi + 3)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
                w4 = tl.load(row + (wi + 4)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            if BITS > 5:
                w5 = tl.load(row + (wi + 5)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            if BITS > 6:
                w6 = tl.load(row + (wi + 6)[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
            codes = _spread(w0, w1, w2, w3, w4, w5, w6, BITS, 32, 0, 1, 32)
        else:
            wb = (k0 // 8 + tl.arange(0, BLOCK_K // 8)) * BITS
            mask = n_mask[:, None] & (wb < row_stride)[None, :]
            w = tl.zeros((rn.shape[0], BLOCK_K // 8), dtype=tl.int64)
            for b in tl.static_range(BITS):  # up to 56 bits: one int64 per 8 codes
                w |= tl.load(row + (wb + b)[None, :], mask=mask, other=0).to(tl.int64) << (8 * b)
            codes = _spread(w, w, w, w, w, w, w, BITS, 64, 0, 1, 8)
        return codes

    @triton.jit
    def _group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The scales (or zero points) of a ``(BLOCK_N, BLOCK_K)`` tile, in fp32: one per row when the
        block lies inside one group (``default_config`` makes it so for power-of-two groups), else
        one per element."""
        if GROUP % BLOCK_K == 0:
            s = tl.load(scales_ptr + rn * n_groups + k0 // GROUP, mask=n_mask, other=0)[:, None]
        else:
            s = tl.load(scales_ptr + rn[:, None] * n_groups + (rk // GROUP)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)  # fmt: skip
        return s.to(tl.float32)

    @triton.jit
    def _qmatmul_kernel(
        x_ptr, y_ptr, packed_ptr, scales_ptr, zeros_ptr, rowptr_ptr, cols_ptr, vals_ptr, bias_ptr,
        M, N, K, stride_xm, stride_ym, row_stride, n_groups,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, HAS_ZEROS: tl.constexpr,
        ZERO_SHIFT: tl.constexpr, HAS_OUTLIERS: tl.constexpr, INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr,
        SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = rm < M, rn < N
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if BLOCK_M == 1:  # decode: multiply-add elementwise, reduce over K once after the loop
            partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        qmin = -(1 << (BITS - 1))

        # num_stages on the loop itself: without it Triton pipelines only loads that feed tl.dot,
        # and the one-row path (no dot) would wait for every tile's codes (bench/results/compiled.md).
        for kb in tl.range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K, num_stages=NUM_STAGES):
            k0 = kb * BLOCK_K
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            x = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            codes = _unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS, BLOCK_K, WORDS)
            if HAS_ZEROS:
                q = codes.to(tl.float32) - _group_scales(zeros_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP,
                                                          BLOCK_K) * (1.0 / (1 << ZERO_SHIFT))  # fmt: skip
            else:
                q = (codes + qmin).to(tl.float32)
            if not PER_ROW:
                q = q * _group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
            w = q.to(x.dtype)
            if BLOCK_M == 1:
                partial += x.to(tl.float32) * w.to(tl.float32)
            else:
                if UPCAST:
                    x, w = x.to(tl.float32), w.to(tl.float32)
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if BLOCK_M == 1:
            acc = tl.sum(partial, axis=1)[None, :]
        if PER_ROW:
            acc = acc * tl.load(scales_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

        if HAS_OUTLIERS:
            n0 = pid_n * BLOCK_N
            start = tl.load(rowptr_ptr + n0).to(INDEX)
            end = tl.load(rowptr_ptr + tl.minimum(n0 + BLOCK_N, N)).to(INDEX)
            # Row of each outlier in the tile: the number of row ends at or before it.
            ends = tl.load(rowptr_ptr + rn + 1, mask=n_mask, other=0).to(INDEX)
            ends = tl.where(n_mask, ends, end)
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
                if BLOCK_M == 1:
                    acc += tl.sum(contrib.reshape(BLOCK_NNZ, 1) * onehot, axis=0)[None, :]
                else:
                    acc += tl.dot(contrib, onehot, input_precision="ieee")

        if HAS_BIAS:  # added once per output: by the first of the split-K programs
            b = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, b, 0.0)[None, :]
        y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y, acc, mask=out_mask)
        else:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _outlier_kernel(
        x_ptr, y_ptr, rowptr_ptr, cols_ptr, vals_ptr, M, N, nnz, stride_xm, stride_ym,
        SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NNZ: tl.constexpr, INDEX: tl.constexpr,
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
            go = tl.load(rowptr_ptr + mid, mask=j_mask, other=0).to(INDEX) <= j
            lo, hi = tl.where(go, mid, lo), tl.where(go, hi, mid)
        col = tl.load(cols_ptr + j, mask=j_mask, other=0).to(tl.int32)
        val = tl.load(vals_ptr + j, mask=j_mask, other=0.0).to(tl.float32)
        mask = m_mask[:, None] & j_mask[None, :]
        xg = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + col[None, :], mask=mask, other=0.0)
        y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + lo[None, :]
        tl.atomic_add(y, xg.to(tl.float32) * val[None, :], mask=mask)

    @triton.jit
    def _dequantize_kernel(
        w_ptr, packed_ptr, scales_ptr, zeros_ptr, col_ptr, N, K, row_stride, n_groups,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
        HAS_COLS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        n_mask, k_mask = rn < N, rk < K
        mask = n_mask[:, None] & k_mask[None, :]
        codes = _unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS, BLOCK_K, WORDS)
        s = _group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
        if HAS_ZEROS:
            z = _group_scales(zeros_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
            w = (codes.to(tl.float32) - z * (1.0 / (1 << ZERO_SHIFT))) * s
        else:
            w = (codes - (1 << (BITS - 1))).to(tl.float32) * s
        if HAS_COLS:
            w = w * tl.load(col_ptr + rk, mask=k_mask, other=0).to(tl.float32)[None, :]
        tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# Whether the kernels above run in Triton's CPU interpreter: triton.jit decided when it ran, at
# import (TRITON_INTERPRET=1 then). A constant, so that torch.compile traces what reads it.
INTERPRETED = triton is not None and type(_qmatmul_kernel).__name__ == "InterpretedFunction"


def _check_available(x: torch.Tensor) -> None:
    if not available(x):
        raise EasyQuantError(
            f"the Triton kernel needs Triton and a CUDA tensor (or TRITON_INTERPRET=1) with activations in "
            f"{[str(d) for d in ACTIVATION_DTYPES]}; got a {x.dtype} tensor on {x.device}"
        )


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully described: :func:`qmatmul` runs it, and
    :mod:`easyquant.kernel_aot` compiles the very same launch for a GPU that is not there."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _packed_rows(qw: QuantizedWeight, block_k: int) -> tuple[torch.Tensor, int, bool]:
    """The packed codes as the kernels read them, their row stride in elements, and whether they
    are read as 32-bit words: widths that do not divide 8, with rows a whole number of words."""
    row_bytes = qw.packed.shape[1]
    if 8 % qw.bits and row_bytes % 4 == 0 and block_k % 32 == 0:
        return qw.packed.view(torch.int32), row_bytes // 4, True
    return qw.packed, row_bytes, False


def _outliers(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row pointer, column and value arguments; with no outliers, stand-ins (never read): an
    empty tensor loaded from safetensors can sit at another tensor's address, which Triton's
    interpreter then copies over, and the format leaves the row pointers out."""
    if qw.outlier_count:
        return qw.outlier_rowptr, qw.outlier_cols, qw.outlier_values
    return qw.scales, qw.scales, qw.scales


def _index_type(qw: QuantizedWeight) -> tl.dtype:
    """What the kernels widen the (narrow) row pointers to: int32, int64 past 2^31 outliers."""
    return tl.int64 if qw.outlier_rowptr.dtype == torch.int64 else tl.int32


def _zeros(qw: QuantizedWeight) -> torch.Tensor:
    """The zeros argument of the kernels: the scales stand in (unread) for a symmetric weight."""
    return qw.scales if qw.zeros is None else qw.zeros


def plan_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, Launch]:
    """The output buffer of :func:`dequantize` and the launch that fills its dense part."""
    n, k = qw.shape
    w = torch.empty(n, k, dtype=dtype, device=qw.packed.device)
    block_n, block_k = 32, fit_block_k(128, qw.group_size)
    packed, row_stride, words = _packed_rows(qw, block_k)
    launch = Launch(
        _dequantize_kernel, (_cdiv(n, block_n), _cdiv(k, block_k)),
        (w, packed, qw.scales, _zeros(qw), qw.scales if qw.col_scales is None else qw.col_scales, n, k, row_stride,
         qw.scales.shape[1]),
        dict(BITS=qw.bits, GROUP=qw.group_size, HAS_ZEROS=qw.asymmetric, ZERO_SHIFT=qw.zero_shift,
             HAS_COLS=qw.col_scales is not None, BLOCK_N=block_n, BLOCK_K=block_k, WORDS=words),
    )  # fmt: skip
    return w, launch


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``qw.dequantize(dtype)`` in one pass over the packed codes, with no int64 temporaries:
    for inputs too long for :func:`qmatmul`, whose weight is then multiplied by cuBLAS."""
    w, launch = plan_dequantize(qw, dtype)
    _check_available(w)
    launch()
    return qw.add_outliers(w)


def plan_qmatmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    config: KernelConfig | None = None,
    outliers: str = "fused",
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """The ``(rows, out)`` output buffer of :func:`qmatmul` and the launches that fill it:
    the tiled matmul (bias included), then (``"balanced"`` outliers) the outlier kernel. A
    dual-axis weight's dense part multiplies the column-scaled activations ``x * col_scales``
    and its outliers ``x`` itself, so they always take the outlier kernel."""
    n, k = qw.shape
    if x.shape[-1] != k:
        raise EasyQuantError(f"activations have {x.shape[-1]} features, the weight expects {k}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise EasyQuantError(f"bias of shape {tuple(bias.shape)} on {bias.device}: expected ({n},) on {x.device}")
    if qw.packed.device != x.device:
        raise EasyQuantError(f"activations are on {x.device}, the quantized weight on {qw.packed.device}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or default_config(m, n, k, multiprocessors(x.device), outliers, qw.group_size)
    balanced = (cfg.outliers == "balanced" or qw.col_scales is not None) and qw.outlier_count > 0
    xd = x2 if qw.col_scales is None else (x2.float() * qw.col_scales.float()).to(x.dtype)
    atomic = cfg.split_k > 1
    if atomic:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:  # fp32 when the outlier kernel adds into it afterwards
        y = torch.empty(m, n, dtype=torch.float32 if balanced else x.dtype, device=x.device)
    if not m:
        return y, []
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
    # there, dot the same bf16 values in fp32, which is what the GPU's bf16 MMA accumulates.
    interpreted_bf16 = x.dtype == torch.bfloat16 and not x.is_cuda and INTERPRETED
    packed, row_stride, words = _packed_rows(qw, cfg.block_k)
    launches = [Launch(
        _qmatmul_kernel, (_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n), cfg.split_k),
        (xd, y, packed, qw.scales, _zeros(qw), *_outliers(qw),
         xd if bias is None else bias.contiguous(),
         m, n, k, xd.stride(0), y.stride(0), row_stride, qw.scales.shape[1]),
        dict(BITS=qw.bits, GROUP=qw.group_size, PER_ROW=qw.scales.shape[1] == 1,
             HAS_ZEROS=qw.asymmetric, ZERO_SHIFT=qw.zero_shift, HAS_OUTLIERS=qw.outlier_count > 0 and not balanced,
             INDEX=_index_type(qw),
             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_NNZ=cfg.block_nnz,
             SPLIT_K=cfg.split_k, ATOMIC=atomic,
             PRECISION="ieee" if x.dtype == torch.float32 or interpreted_bf16 else "tf32",
             UPCAST=interpreted_bf16, HAS_BIAS=bias is not None, NUM_STAGES=cfg.num_stages, WORDS=words),
        cfg.num_warps, cfg.num_stages,
    )]  # fmt: skip
    if balanced:
        block_m = min(1 << (m - 1).bit_length(), 16)
        launches.append(Launch(
            _outlier_kernel, (_cdiv(qw.outlier_count, cfg.block_nnz), _cdiv(m, block_m)),
            (x2, y, qw.outlier_rowptr, qw.outlier_cols, qw.outlier_values, m, n, qw.outlier_count,
             x2.stride(0), y.stride(0)),
            dict(SEARCH_STEPS=max(1, n.bit_length()), BLOCK_M=block_m, BLOCK_NNZ=cfg.block_nnz, INDEX=_index_type(qw)),
        ))  # fmt: skip
    return y, launches


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
    y, launches = plan_qmatmul(x, qw, config, outliers, bias)
    for launch in launches:
        launch()
    y = y.to(x.dtype)  # a no-op unless split-K or the outlier kernel accumulated in fp32
    return y.reshape(*x.shape[:-1], qw.shape[0])
