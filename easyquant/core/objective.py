"""What a range solver minimises: a weighted p-norm of the reconstruction error.

``L(s) = sum_j c_j |Q_s[w_j] - w_j|^p`` per row (or group), with ``c_j >= 0`` the importance
of each weight: 0 for outliers and padding, 1 by default, or a per-column weight the
pipeline derives from the model (the norm weights that scale a projection's inputs).
``p = 2`` is the paper's squared error; ``p > 2`` (GPTQ's range search uses 2.4) penalises
large errors more and clips less, which tracks model quality better on real models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import Grid


@dataclass(frozen=True)
class Objective:
    p: float = 2.0

    def __post_init__(self) -> None:
        if not self.p >= 1:
            raise ValueError(f"the objective's norm p must be >= 1, got {self.p}")

    def error_cost(self, e: torch.Tensor) -> torch.Tensor:
        """``|e|^p`` as a new tensor, with the common integer norms spelled out (``pow`` is several
        times slower). Where no gradient is traced, ``e`` is used up (made ``|e|`` in place): every
        caller passes an error it has just made."""
        if self.p == 2:
            return e.square()
        if e.requires_grad:
            return e.abs().pow(self.p)
        if self.p == 3:
            a = e.abs_()
            return a.square().mul_(a)
        if self.p == 4:
            return e.square().square_()
        return e.abs().pow_(self.p)

    def loss(
        self,
        w: torch.Tensor,
        c: torch.Tensor,
        s: torch.Tensor,
        grid: Grid,
        work: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-row loss at per-row scales ``s`` (shape ``(rows,)``). Untraced, it is computed in
        steps of the grid, ``|s|^p sum_j c_j |q_j - w_j / s|^p``, in the two buffers ``work`` (each
        ``w``'s shape; made if not given): the search evaluates it some twenty times per block,
        and on a CPU a fresh temporary the size of the rows costs more in page faults than the
        arithmetic on it."""
        if s.requires_grad:
            return self.weighted(grid.fake_quant(w, s[:, None]) - w, c)
        r, d = work if work is not None else (torch.empty_like(w), torch.empty_like(w))
        torch.div(w, s[:, None], out=r)
        torch.round(r, out=d).clamp_(grid.qmin, grid.qmax).sub_(r)  # the error in steps; r is free now
        if self.p == 2:
            cost = d.square_().mul_(c)
        elif self.p == 3:
            torch.mul(d.abs_(), c, out=r)
            cost = d.square_().mul_(r)
        else:
            cost = d.abs_().pow_(self.p).mul_(c)
        return cost.sum(dim=1) * s.abs().pow(self.p)

    def affine_loss(
        self, w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, m: torch.Tensor, grid: Grid
    ) -> torch.Tensor:
        """Per-row loss of the asymmetric grid at scales ``s`` and zero points ``m`` (each ``(rows,)``)."""
        return self.weighted(grid.affine_fake_quant(w, s[:, None], m[:, None]) - w, c)

    def weighted(self, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``sum_j c_j |e_j|^p`` per row."""
        cost = self.error_cost(e)  # a new tensor: safe to scale in place where untraced
        return (c * cost if cost.requires_grad else cost.mul_(c)).sum(dim=1)

    def grad(self, w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Exact ``dL/ds`` almost everywhere, by autograd through ``s * clamp(round(w / s))``:
        ``sum c p |e|^(p-1) sign(e) clamp(round(w/s))``. Rounding is piecewise constant (autograd
        gives it derivative 0), so only the scale's own factor carries a derivative; the clamp
        matters: a clipped weight's code is the grid's end, not w/s."""
        s = s.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss(w, c, s, grid).sum(), s)
        return g
