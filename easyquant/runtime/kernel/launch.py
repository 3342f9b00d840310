"""Triton matmul of activations with a :class:`QuantizedWeight`: packed codes plus CSR outliers.

``y = x @ W.T`` where ``W = scales * (codes + qmin)`` (asymmetric weights:
``scales * (codes - zeros / 2^zero_shift)``) with the fp16 outliers written over it. Because outlier
positions hold the code of 0 (see :mod:`easyquant.core.qweight`), the product splits exactly into
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
arguments, constants) and :func:`qmatmul` runs them; :mod:`easyquant.runtime.kernel.aot` compiles the
same descriptions for a GPU that is not there. Runs on CUDA, and on the CPU under
``TRITON_INTERPRET=1`` (set before this module is imported), which is how the tests check it
against ``dequantize()`` and a plain matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.qweight import QuantizedWeight
from ...errors import EasyQuantError
from .backend import tl, triton
from .balanced import outlier_kernel
from .configs import ACTIVATION_DTYPES, KernelConfig, cdiv, default_config, fit_block_k, multiprocessors
from .dequant import dequantize_kernel
from .matmul import qmatmul_kernel

# Whether the kernels above run in Triton's CPU interpreter: triton.jit decided when it ran, at
# import (TRITON_INTERPRET=1 then). A constant, so that torch.compile traces what reads it.
INTERPRETED = triton is not None and type(qmatmul_kernel).__name__ == "InterpretedFunction"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``: Triton is installed and ``x`` is on a GPU
    (or the interpreter is on, for tests on the CPU)."""
    if triton is None or x.dtype not in ACTIVATION_DTYPES:
        return False
    return x.is_cuda or INTERPRETED


def _check_available(x: torch.Tensor) -> None:
    if not available(x):
        raise EasyQuantError(
            f"the Triton kernel needs Triton and a CUDA tensor (or TRITON_INTERPRET=1) with activations in "
            f"{[str(d) for d in ACTIVATION_DTYPES]}; got a {x.dtype} tensor on {x.device}"
        )


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully described: :func:`qmatmul` runs it, and
    :mod:`easyquant.runtime.kernel.aot` compiles the very same launch for a GPU that is not there."""

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
        dequantize_kernel, (cdiv(n, block_n), cdiv(k, block_k)),
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
        qmatmul_kernel, (cdiv(m, cfg.block_m), cdiv(n, cfg.block_n), cfg.split_k),
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
            outlier_kernel, (cdiv(qw.outlier_count, cfg.block_nnz), cdiv(m, block_m)),
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
