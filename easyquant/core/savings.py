"""Outliers chosen by what they save: for a budget of k per tensor (or per row), the k weights
whose removal most lowers the quantization loss once the ranges are solved again.

The n-sigma rule keeps the weights far from the tensor's mean, but a weight saves most where it
alone stretches a narrow group's range, which a tensor-wide sigma cannot see. Each group offers
its ``depth`` largest kept weights in order; the loss of the group without its top 0, 1, ...,
``depth`` is solved by the caller's range solver, which gives each group a curve of savings
(every group without its largest weight; deeper, only the groups whose last step still ranks
within the budget: a few solves of the matrix in all). The budget goes to the largest savings
across groups, a group's weights taken in order of size, on the concave envelope of each curve
(so that a second weight that saves more than the first, together with it, is still reached).
Data-free, and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .groups import from_groups, to_groups

# Losses of groups (rows of a grouped matrix) under importances c, the ranges solved anew.
GroupLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def envelope_gains(savings: torch.Tensor) -> torch.Tensor:
    """Marginal gains ``(groups, depth)`` on the upper concave envelope of cumulative savings
    ``(groups, depth + 1)`` (column 0 is 0, no weight removed): non-increasing along each row,
    summing to each row's largest saving at the envelope's vertices."""
    n = savings.shape[1]
    env = savings.clone()
    for a in range(n):
        for b in range(a + 2, n):
            for j in range(a + 1, b):
                chord = savings[:, a] + (savings[:, b] - savings[:, a]) * (j - a) / (b - a)
                env[:, j] = torch.maximum(env[:, j], chord)
    return env.diff(dim=1).clamp_min(0)


def savings_mask(
    w: torch.Tensor,
    c: torch.Tensor,
    budget: torch.Tensor,
    group_size: int,
    depth: int,
    group_loss: GroupLoss,
) -> torch.Tensor:
    """Boolean outlier mask ``(rows, cols)`` of ``w`` with importances ``c`` (0: not quantized):
    ``budget`` outliers in all (a 0-d count) or per row (``(rows,)``), each group of
    ``group_size`` columns offering its ``depth`` largest weights. A weight that saves nothing is
    never taken, so the mask holds at most the budget."""
    rows, cols = w.shape
    wg, cg = to_groups(w, group_size), to_groups(c, group_size)
    n_groups, width = wg.shape
    depth = max(1, min(depth, width))
    per_row = budget.dim() == 1
    scopes = rows if per_row else 1
    limit = (budget if per_row else budget.reshape(1)).to(torch.long)
    order = torch.where(cg > 0, wg.abs(), torch.full_like(wg, -1.0)).topk(depth, dim=1).indices
    losses = [group_loss(wg, cg)]
    active = torch.arange(n_groups, device=w.device)
    for j in range(depth):
        cg = cg.scatter(1, order[:, j : j + 1], 0.0)
        loss = losses[-1].clone()  # a group not offered deeper saves nothing more
        loss[active] = group_loss(wg[active], cg[active])
        losses.append(loss)
        # Only a group whose last step ranks within its scope's budget can use one more weight.
        step = (losses[-2] - loss).reshape(scopes, -1)
        ranks = torch.empty_like(step, dtype=torch.long).scatter_(
            1,
            step.sort(dim=1, descending=True, stable=True).indices,
            torch.arange(step.shape[1], device=w.device).expand_as(step),
        )
        active = ((ranks < limit[:, None]) & (step > 0)).reshape(-1).nonzero().squeeze(1)
        if active.numel() == 0:
            break
    losses += [losses[-1]] * (depth + 1 - len(losses))
    table = torch.stack(losses, dim=1)  # (groups, depth + 1)
    gains = envelope_gains(table[:, :1] - table).reshape(scopes, -1)  # a scope's candidates, in (group, rank) order
    best, ranked = gains.sort(dim=1, descending=True, stable=True)  # ties: a group's larger weight first
    chosen = (torch.arange(gains.shape[1], device=w.device) < limit[:, None]) & (best > 0)  # nothing for nothing
    take = torch.zeros_like(gains, dtype=torch.bool).scatter_(1, ranked, chosen)
    picked = torch.zeros_like(wg, dtype=torch.bool).scatter(1, order, take.reshape(n_groups, depth))
    return from_groups(picked, rows, cols)
