"""The dense+CSR kernel: each program multiplies one output tile from the packed codes and adds
the outliers of its own rows (see :mod:`easyquant.runtime.kernel.launch` for the whole design)."""

from __future__ import annotations

from .backend import tl, triton

if triton is not None:
    from .tiles import group_scales, unpack_tile

    @triton.jit
    def qmatmul_kernel(
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
            codes = unpack_tile(packed_ptr, row_stride, rn, k0, n_mask, BITS, BLOCK_K, WORDS)
            if HAS_ZEROS:
                q = codes.to(tl.float32) - group_scales(zeros_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP,
                                                          BLOCK_K) * (1.0 / (1 << ZERO_SHIFT))  # fmt: skip
            else:
                q = (codes + qmin).to(tl.float32)
            if not PER_ROW:
                q = q * group_scales(scales_ptr, rn, rk, k0, n_mask, k_mask, n_groups, GROUP, BLOCK_K)
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
