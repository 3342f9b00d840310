"""n-sigma outlier isolation: the few weights EasyQuant keeps exactly, in fp16.

The paper's rule, per tensor: ``|W_ij - mean(W)| >= n * std(W)``. Per row (``scope="row"``)
uses each output row's own mean and std, which adapts to rows of very different spread.
"""

from __future__ import annotations

from typing import Literal

import torch

Scope = Literal["tensor", "row"]


def sigma_mask(w: torch.Tensor, n_sigma: float, scope: Scope = "tensor") -> torch.Tensor:
    """Boolean mask of the outliers of a 2-D float tensor.

    A population whose std is 0 (a constant tensor or row) has no outliers: every weight
    is exactly representable, and ``|w - mean| >= 0`` would otherwise select them all.
    """
    if n_sigma <= 0:
        raise ValueError(f"n_sigma must be positive, got {n_sigma}")
    if scope == "tensor":
        x = w.double()
        mean, std = x.mean(), x.std(correction=0)
    elif scope == "row":
        x = w.double()
        mean, std = x.mean(dim=1, keepdim=True), x.std(dim=1, correction=0, keepdim=True)
    else:
        raise ValueError(f"outlier scope must be 'tensor' or 'row', got {scope!r}")
    return ((x - mean).abs() >= n_sigma * std) & (std > 0)
