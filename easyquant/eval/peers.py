"""Other data-free quantizers, run on the same weights for comparison: HQQ (its own package) and
SINQ (re-implemented; see :func:`sinq_quantize`).

Each returns the dequantized weight and its bits per weight with every overhead counted.
"""

from __future__ import annotations

import torch

from ..core.groups import group_count
from ..core.sinkhorn import column_tiles, sinkhorn_scales


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, float]:
    """HQQ (PyPI ``hqq``) with its library defaults: asymmetric, groups along the input
    dimension (``axis=1``), zero point optimised by its half-quadratic solver, scale and
    zero stored in fp16 (as ``HQQLinear`` keeps them)."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        w.float(),
        nbits=bits,
        group_size=group_size,
        optimize=True,
        round_zero=bits == 4,
        axis=1,
        bitpack=False,
        device=str(w.device),
    )
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    deq = ((w_q.float() - zero) * scale).reshape(w.shape)
    overhead = 2 * 16 * scale.numel() / w.numel()
    return deq.to(w.dtype), bits + overhead


def sinq_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, float]:
    """SINQ (Sinkhorn-normalised quantization, arXiv 2509.22944), its default data-free recipe
    re-implemented here from the paper and its reference code's defaults: the matrix cut into
    tiles of ``group_size`` columns (1-D tiling; the last tile shorter where the size does not
    divide the row); each tile normalised by
    :func:`sinkhorn_scales`; then asymmetric min-max round-to-nearest per row of the tile with an
    integer zero point. Stored: per row and group an fp16 scale (the row factor folded in) and
    an fp16 zero point, per column an fp16 scale. (PyPI ``sinq`` is not used: its wheel installs
    a ``sitecustomize.py`` that patches every Python process of the environment at start.)"""
    rows, cols = w.shape
    top = 2**bits - 1
    deq = torch.empty(rows, cols)
    for span, tiles in column_tiles(w.float(), group_size):  # tiles (n, rows, group)
        col, row = sinkhorn_scales(tiles)
        x = tiles / col[:, None, :] / row[:, :, None]
        lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
        scale = (hi - lo).clamp_min(1e-4) / top
        zero = -torch.round(lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, top)
        stored_scale, stored_col = (scale * row[:, :, None]).half().float(), col.half().float()
        deq[:, span] = ((q - zero) * stored_scale * stored_col[:, None, :]).transpose(0, 1).reshape(rows, -1)
    overhead = 2 * 16 * group_count(cols, group_size) / cols + 16 / rows
    return deq.to(w.dtype), bits + overhead
