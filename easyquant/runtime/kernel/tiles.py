"""Triton helpers shared by the kernels: unpacking a tile of packed codes into columns, and
loading the per-group scales (or zero points) of a tile."""

from __future__ import annotations

from .backend import tl, triton

if triton is not None:

    @triton.jit
    def pick_word(w0, w1, w2, w3, w4, w5, w6, i: tl.constexpr):
        """Word ``i`` of a group held as separate planes (chosen at compile time)."""
        if i == 0:
            w = w0
        else:
            w = pick_word(w1, w2, w3, w4, w5, w6, w6, i - 1)
        return w

    @triton.jit
    def code_at(w0, w1, w2, w3, w4, w5, w6, j: tl.constexpr, BITS: tl.constexpr, WORD_BITS: tl.constexpr):
        """Code ``j`` of a group of codes packed lowest bits first into words ``w0, w1, ...`` of
        ``WORD_BITS`` unsigned bits, joining the two words it straddles; int32."""
        lo = pick_word(w0, w1, w2, w3, w4, w5, w6, j * BITS // WORD_BITS) >> (j * BITS % WORD_BITS)
        if j * BITS % WORD_BITS + BITS > WORD_BITS:
            hi = pick_word(w0, w1, w2, w3, w4, w5, w6, j * BITS // WORD_BITS + 1)
            lo = lo | (hi << (WORD_BITS - j * BITS % WORD_BITS))
        return (lo & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def spread(w0, w1, w2, w3, w4, w5, w6, BITS: tl.constexpr, WORD_BITS: tl.constexpr,
                FIRST: tl.constexpr, STEP: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
        """Codes ``FIRST, FIRST + STEP, ...`` (``COUNT`` of them) of every group, as consecutive
        columns: each level interleaves the even-numbered codes with the odd-numbered ones."""
        if COUNT == 1:
            codes = code_at(w0, w1, w2, w3, w4, w5, w6, FIRST, BITS, WORD_BITS)
        else:
            codes = tl.interleave(
                spread(w0, w1, w2, w3, w4, w5, w6, BITS, WORD_BITS, FIRST, 2 * STEP, COUNT // 2),
                spread(w0, w1, w2, w3, w4, w5, w6, BITS, WORD_BITS, FIRST + STEP, 2 * STEP, COUNT // 2),
            )
        return codes

    @triton.jit
    def unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                     WORDS: tl.constexpr):  # fmt: skip
        """Unsigned codes ``(BLOCK_N, BLOCK_K)`` of rows ``rn``, columns ``k0 + arange(BLOCK_K)`` (int32).

        Every packed byte is loaded once (:mod:`easyquant.core.packing`: 8 codes to every ``BITS``
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
            codes = spread(w, w, w, w, w, w, w, BITS, 8, 0, 1, 8 // BITS)
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
            codes = spread(w0, w1, w2, w3, w4, w5, w6, BITS, 32, 0, 1, 32)
        else:
            wb = (k0 // 8 + tl.arange(0, BLOCK_K // 8)) * BITS
            mask = n_mask[:, None] & (wb < row_stride)[None, :]
            w = tl.zeros((rn.shape[0], BLOCK_K // 8), dtype=tl.int64)
            for b in tl.static_range(BITS):  # up to 56 bits: one int64 per 8 codes
                w |= tl.load(row + (wb + b)[None, :], mask=mask, other=0).to(tl.int64) << (8 * b)
            codes = spread(w, w, w, w, w, w, w, BITS, 64, 0, 1, 8)
        return codes

    @triton.jit
    def group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The scales (or zero points) of a ``(BLOCK_N, BLOCK_K)`` tile, in fp32: one per row when the
        block lies inside one group (``default_config`` makes it so for power-of-two groups), else
        one per element."""
        if GROUP % BLOCK_K == 0:
            s = tl.load(scales_ptr + rn * n_groups + k0 // GROUP, mask=n_mask, other=0)[:, None]
        else:
            s = tl.load(scales_ptr + rn[:, None] * n_groups + (rk // GROUP)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)  # fmt: skip
        return s.to(tl.float32)
