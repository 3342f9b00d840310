"""The balanced outlier kernel: every program adds the same number of outliers, whatever rows
they fall on, for weights whose outliers crowd into some rows."""

from __future__ import annotations

from .backend import tl, triton

if triton is not None:

    @triton.jit
    def outlier_kernel(
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
