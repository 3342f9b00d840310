"""The dequantize kernel: the dense part of a weight in one pass over its packed codes."""

from __future__ import annotations

from .backend import tl, triton

if triton is not None:
    from .tiles import group_scales, unpack_tile

    @triton.jit
    def dequantize_kernel(
        w_ptr, packed_ptr, scales_ptr, zeros_ptr, col_ptr, N, K, row_stride, n_groups,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
        HAS_COLS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        n_mask, k_mask = rn < N, rk < K
        mask = n_mask[:, None] & k_mask[None, :]
        codes = unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS, BLOCK_K, WORDS)
        s = group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
        if HAS_ZEROS:
            z = group_scales(zeros_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
            w = (codes.to(tl.float32) - z * (1.0 / (1 << ZERO_SHIFT))) * s
        else:
            w = (codes - (1 << (BITS - 1))).to(tl.float32) * s
        if HAS_COLS:
            w = w * tl.load(col_ptr + rk, mask=k_mask, other=0).to(tl.float32)[None, :]
        tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)
