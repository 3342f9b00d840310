"""Other data-free quantizers, run on the same weights for comparison: HQQ (its own package) and
SINQ (re-implemented; see :func:`sinq_quantize`).

Each returns the dequantized weight and its bits per weight with every overhead counted.
"""

from __future__ import annotations

import torch


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


def _push(std: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One Sinkhorn step's change of the log scales: each standard deviation over the tile's target."""
    return (std.clamp(1e-3, 1e3) / target[:, None]).clamp(0.7, 2.0).log()


def sinkhorn_scales(t: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """SINQ's normalisation of a batch of tiles ``t`` ``(n, rows, cols)``: per-column and per-row
    scales ``(n, cols)``, ``(n, rows)`` such that ``t / col / row`` has rows and columns of like
    spread. Each step divides every row's and column's log standard deviation, relative to the
    tile's smallest one, into its scale (each factor clamped to [0.7, 2], the log scales to
    [-0.3, 10]); a tile stops once its imbalance (largest over smallest row or column standard
    deviation) rises, and keeps the scales at its lowest imbalance."""
    t = t.float()
    n, rows, cols = t.shape

    def imbalance(x: torch.Tensor) -> torch.Tensor:
        s_row, s_col = x.std(2), x.std(1)
        low = torch.minimum(s_row.amin(1), s_col.amin(1)).clamp_min(1e-12)
        return torch.maximum(s_row.amax(1), s_col.amax(1)) / low

    target = torch.minimum(t.std(2).clamp(1e-3, 1e3).amin(1), t.std(1).clamp(1e-3, 1e3).amin(1)) + 1e-6
    log_col, log_row = t.new_zeros(n, cols), t.new_zeros(n, rows)
    best = imbalance(t)
    best_col, best_row = t.new_ones(n, cols), t.new_ones(n, rows)
    running = torch.ones(n, dtype=torch.bool, device=t.device)
    for _ in range(steps):
        cur = t / log_col.exp()[:, None, :] / log_row.exp()[:, :, None]
        ib = imbalance(cur)
        better = ib <= best
        best = torch.minimum(best, ib)
        best_col = torch.where(better[:, None], log_col.exp(), best_col)
        best_row = torch.where(better[:, None], log_row.exp(), best_row)
        running &= ib <= best
        step = running.float()[:, None]
        log_col = (log_col + _push(cur.std(1), target) * step).clamp(-0.3, 10.0)
        log_row = (log_row + _push(cur.std(2), target) * step).clamp(-0.3, 10.0)
    return best_col, best_row


def sinq_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, float]:
    """SINQ (Sinkhorn-normalised quantization, arXiv 2509.22944), its default data-free recipe
    re-implemented here from the paper and its reference code's defaults: the matrix cut into
    tiles of ``group_size`` columns (1-D tiling); each tile normalised by
    :func:`sinkhorn_scales`; then asymmetric min-max round-to-nearest per row of the tile with an
    integer zero point. Stored: per row and group an fp16 scale (the row factor folded in) and
    an fp16 zero point, per column an fp16 scale. (PyPI ``sinq`` is not used: its wheel installs
    a ``sitecustomize.py`` that patches every Python process of the environment at start.)"""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"SINQ's 1-D tiles need the group size to divide the {cols} columns, got {group_size}")
    top = 2**bits - 1
    tiles = w.float().reshape(rows, cols // group_size, group_size).transpose(0, 1)  # (tiles, rows, group)
    col, row = sinkhorn_scales(tiles)
    x = tiles / col[:, None, :] / row[:, :, None]
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    scale = (hi - lo).clamp_min(1e-4) / top
    zero = -torch.round(lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, top)
    stored_scale, stored_col = (scale * row[:, :, None]).half().float(), col.half().float()
    deq = (q - zero) * stored_scale * stored_col[:, None, :]
    overhead = 2 * 16 / group_size + 16 / rows
    return deq.transpose(0, 1).reshape(rows, cols).to(w.dtype), bits + overhead
