"""Dual-axis scaling: a scale per input column beside the row (or group) scales, found without data.

SINQ (arXiv 2509.22944) observes that a weight matrix whose columns differ in spread wastes
levels: a row's grid must span its widest column. Dividing each column by a scale ``t_j``
first, chosen by Sinkhorn-style alternating normalisation of the row and column standard
deviations, evens the matrix out; the weight is then ``W[r, j] = t_j * Q[W / t][r, j]``, and
``t`` is applied to the activations at inference (one vector per layer: ``W x = Q (t * x)``).
Each column lies in exactly one group, so per-group tiles still give one vector per layer.
"""

from __future__ import annotations

import math

import torch

from .grid import to_fp16_grid
from .groups import block_elements


def _push(std: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One Sinkhorn step's change of the log scales: each standard deviation over the tile's target."""
    return (std.clamp(1e-3, 1e3) / target[:, None]).clamp(0.7, 2.0).log()


def _spreads(t: torch.Tensor, t2: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Standard deviations (unbiased) of every row ``(n, rows)`` and column ``(n, cols)`` of
    ``t / col / row``, from sums that are matrix-vector products with ``t`` and ``t2 = t * t``:
    four passes over the tile instead of writing the scaled tile and reducing it twice."""
    rows, cols = t.shape[1:]
    ic, ir = col.reciprocal(), row.reciprocal()
    r1 = (t @ ic[..., None])[..., 0] * ir
    r2 = (t2 @ ic.square()[..., None])[..., 0] * ir.square()
    c1 = (ir[:, None, :] @ t)[:, 0] * ic
    c2 = (ir.square()[:, None, :] @ t2)[:, 0] * ic.square()
    row_var = (r2 - r1.square() / cols) / (cols - 1)
    col_var = (c2 - c1.square() / rows) / (rows - 1)
    return row_var.clamp_min(0).sqrt(), col_var.clamp_min(0).sqrt()


def sinkhorn_scales(t: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """SINQ's normalisation of a batch of tiles ``t`` ``(n, rows, cols)`` (at least 2 by 2):
    per-column and per-row scales ``(n, cols)``, ``(n, rows)`` such that ``t / col / row`` has
    rows and columns of like spread. Each step divides every row's and column's log standard
    deviation, relative to the tile's smallest one, into its scale (each factor clamped to
    [0.7, 2], the log scales to [-0.3, 10]); a tile stops once its imbalance (largest over
    smallest row or column standard deviation) rises, and keeps the scales at its lowest imbalance."""
    t = t.float()
    t2 = t.square()
    n, rows, cols = t.shape

    def imbalance(s_row: torch.Tensor, s_col: torch.Tensor) -> torch.Tensor:
        low = torch.minimum(s_row.amin(1), s_col.amin(1)).clamp_min(1e-12)
        return torch.maximum(s_row.amax(1), s_col.amax(1)) / low

    log_col, log_row = t.new_zeros(n, cols), t.new_zeros(n, rows)
    best_col, best_row = t.new_ones(n, cols), t.new_ones(n, rows)
    s_row, s_col = _spreads(t, t2, best_col, best_row)
    target = torch.minimum(s_row.clamp(1e-3, 1e3).amin(1), s_col.clamp(1e-3, 1e3).amin(1)) + 1e-6
    best = imbalance(s_row, s_col)
    running = torch.ones(n, dtype=torch.bool, device=t.device)
    for _ in range(steps - 1):
        step = running.float()[:, None]
        log_col = (log_col + _push(s_col, target) * step).clamp(-0.3, 10.0)
        log_row = (log_row + _push(s_row, target) * step).clamp(-0.3, 10.0)
        col, row = log_col.exp(), log_row.exp()
        s_row, s_col = _spreads(t, t2, col, row)
        ib = imbalance(s_row, s_col)
        better = ib <= best
        best = torch.minimum(best, ib)
        best_col = torch.where(better[:, None], col, best_col)
        best_row = torch.where(better[:, None], row, best_row)
        running &= better
        if not bool(running.any()):  # every tile has stopped: nothing would change any more
            break
    return best_col, best_row


def column_scales(w: torch.Tensor, keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-column scales ``(cols,)`` of ``w`` as they will be stored (fp16 values, positive):
    :func:`sinkhorn_scales` on each tile of ``group_size`` columns (the last one shorter where
    the group size does not divide the row), with the weights not kept (outliers) set to 0 so
    that they do not widen their columns' spread. Only the ratios between columns matter (the
    row or group scales take the rest), so the tiles are first brought to unit spread (the
    standard deviation of the whole masked matrix, from the tiles' sums: no copy of the matrix
    beyond the tiles themselves)."""
    batches = column_tiles(w.float(), group_size, keep)
    n = w.numel()
    total = sum(float(t.sum()) for _, t in batches)
    squares = sum(float(torch.linalg.vector_norm(t)) ** 2 for _, t in batches)
    spread = math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0
    parts = []
    for span, tiles in batches:
        if min(tiles.shape[1:]) < 2:  # no spread to even out
            parts.append(tiles.new_ones(span.stop - span.start))
            continue
        if spread > 0:  # Sinkhorn's clamps are set for weights of unit spread
            tiles.div_(spread)
        parts.append(sinkhorn_scales(tiles)[0].reshape(-1))
    return to_fp16_grid(torch.cat(parts))


def column_tiles(
    x: torch.Tensor, group_size: int, keep: torch.Tensor | None = None
) -> list[tuple[slice, torch.Tensor]]:
    """``(rows, cols)`` cut into tiles of ``group_size`` columns, in contiguous batches
    ``(tiles, rows, width)`` of at most about ``elements`` weights (at least one tile), with a
    shorter last tile on its own where the size does not divide the row; each batch with the
    columns it covers, a copy (``keep``: with the weights not kept set to 0). Tiles are
    independent (a batch's size changes at most the rounding of the matrix products); batches
    that fit in cache (:func:`~easyquant.core.groups.block_elements`) make Sinkhorn's repeated
    passes over them faster on a CPU."""
    rows, cols = x.shape
    elements = block_elements(x.device)
    full = cols // group_size * group_size
    per_batch = max(1, elements // (rows * group_size)) * group_size
    spans = [(slice(a, min(a + per_batch, full)), group_size) for a in range(0, full, per_batch)]
    spans += [(slice(full, cols), cols - full)] if full < cols else []

    def tiles(span: slice, width: int) -> torch.Tensor:
        part = x[:, span] if keep is None else torch.where(keep[:, span], x[:, span], 0.0)
        return part.reshape(rows, -1, width).transpose(0, 1).contiguous()

    return [(span, tiles(span, width)) for span, width in spans]
