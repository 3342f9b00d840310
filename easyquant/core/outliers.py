"""n-sigma outlier isolation: the few weights EasyQuant keeps exactly, in fp16.

The paper's rule, per tensor: ``|W_ij - mean(W)| >= n * std(W)``. Per row (``scope="row"``)
uses each output row's own mean and std, which adapts to rows of very different spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from .groups import block_elements

Scope = Literal["tensor", "row"]


def sigma_mask(w: torch.Tensor, n_sigma: float, scope: Scope = "tensor") -> torch.Tensor:
    """Boolean mask of the outliers of a 2-D float tensor.

    A population whose std is 0 (a constant tensor or row) has no outliers: every weight
    is exactly representable, and ``|w - mean| >= 0`` would otherwise select them all.
    """
    if n_sigma <= 0:
        raise ValueError(f"n_sigma must be positive, got {n_sigma}")
    if scope not in ("tensor", "row"):
        raise ValueError(f"outlier scope must be 'tensor' or 'row', got {scope!r}")
    # Mean and std in fp64, summed over blocks of rows (no fp64 copy of the whole matrix), then
    # the test as two bounds per row: ``x >= hi or x <= lo`` against the fp32 values nearest
    # inside them, which for fp32 weights is ``|x - mean| >= n * std``.
    x = w.float()
    rows, cols = x.shape
    per_row, step = scope == "row", max(1, block_elements(x.device) // cols)
    count = cols if per_row else x.numel()

    def total(f: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Sums of ``f(first row, block in fp64)``, per row or over the whole matrix."""
        sums = torch.cat([f(r, x[r : r + step].double()).sum(dim=1) for r in range(0, rows, step)])
        return sums[:, None] if per_row else sums.sum()

    mean = total(lambda r, b: b) / count
    std = (total(lambda r, b: (b - (mean[r : r + step] if per_row else mean)).square()) / count).sqrt()
    return ((x >= _inward(mean + n_sigma * std, up=True)) | (x <= _inward(mean - n_sigma * std, up=False))) & (std > 0)


def _inward(bound: torch.Tensor, up: bool) -> torch.Tensor:
    """The fp32 value ``f`` with ``x >= bound <=> x >= f`` (``up``) or ``x <= bound <=> x <= f``
    for every fp32 ``x``: the bound rounded towards the side it admits."""
    f = bound.float()
    off = (f.double() < bound) if up else (f.double() > bound)
    return torch.where(off, torch.nextafter(f, torch.full_like(f, math.inf if up else -math.inf)), f)
