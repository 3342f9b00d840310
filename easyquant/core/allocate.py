"""Bits where they matter: a setting per layer under a total bits-per-weight budget, without data.

Each layer is scored at every setting of a small menu (bit width one below, at and one above
the base, groups of the base size and twice it, outliers kept or not) by its relative error
``||W - Q[W]||^2 / ||W||^2`` times its size: the sum over layers is then the model's mean
relative error per weight. The error is round-to-nearest's at max-abs ranges, without column
scales, and the size what the setting stores: solving every setting (as the first version did)
cost about twelve times the default's quantization, while the plans RTN's errors give stay
within about 1% of the solved plans' own weight error (RESULTS.md, "Bits per layer: scored by
round-to-nearest"). (The plain sum of relative errors, each layer counted
once whatever its size, was tried first: it gave small layers bits that large ones needed and
lost to one setting everywhere on MiniLM; RESULTS.md, "Bits per layer".) Choosing one setting per
layer to minimise that sum under the budget is a
multiple-choice knapsack, solved the standard way: each layer keeps only its lower convex hull of
(bits, error), starts at its cheapest point, and the budget buys the steps of best error saved
per bit first (a layer's steps in order, since the hull makes them ever less efficient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product

import torch

from ..errors import EasyQuantError
from ..progress import progress_bar
from .grid import MAX_BITS, MIN_BITS
from .quantize import QuantConfig, rtn_errors
from .qweight import storage_bytes


@dataclass(frozen=True)
class Choice:
    """One setting of one layer: its total storage in bits and its error."""

    bits: float
    error: float


def menu(base: QuantConfig) -> list[QuantConfig]:
    """The settings a layer may take: bits one below, at and one above ``base.bits`` (within the
    grid's range), groups of ``base``'s size and twice it, outliers as ``base`` keeps them or none."""
    bits = [b for b in (base.bits - 1, base.bits, base.bits + 1) if MIN_BITS <= b <= MAX_BITS]
    groups = [base.group_size] if base.group_size is None else [base.group_size, 2 * base.group_size]
    sigmas = [base.n_sigma] if base.n_sigma is None else [base.n_sigma, None]
    return [replace(base, bits=b, group_size=g, n_sigma=n) for b, g, n in product(bits, groups, sigmas)]


def _hull(choices: list[Choice]) -> list[int]:
    """Indices of the lower convex hull of ``choices`` from the cheapest, each point cheaper in
    error than the one before (ties in bits go to the lower error, then the earlier index)."""
    order = sorted(range(len(choices)), key=lambda i: (choices[i].bits, choices[i].error, i))
    hull: list[int] = []
    for i in order:
        c = choices[i]
        if hull and c.error >= choices[hull[-1]].error:
            continue  # costs more and saves nothing
        while len(hull) >= 2:
            a, b = choices[hull[-2]], choices[hull[-1]]
            # b lies on or above the chord from a to c: never worth stopping at.
            if (b.error - a.error) * (c.bits - a.bits) >= (c.error - a.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: list[list[Choice]], budget: float) -> list[int]:
    """Each layer's chosen index into its choices: the least total error whose total bits stay
    within ``budget`` (greedy on the hulls: exact at the budgets it lands on a hull point,
    within one step of a layer otherwise). Deterministic, ties by layer order."""
    hulls = [_hull(c) for c in layers]
    pick = [h[0] for h in hulls]
    spent = sum(c[i].bits for c, i in zip(layers, pick, strict=True))
    if spent > budget:
        raise EasyQuantError(f"a budget of {budget:.0f} bits is below the cheapest settings' {spent:.0f}")
    steps = []
    for layer, (choices, hull) in enumerate(zip(layers, hulls, strict=True)):
        for k in range(1, len(hull)):
            a, b = choices[hull[k - 1]], choices[hull[k]]
            steps.append(((a.error - b.error) / (b.bits - a.bits), layer, k))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    reached = [0] * len(layers)
    for _, layer, k in steps:
        if reached[layer] != k - 1:
            continue  # an earlier step of this layer did not fit
        a, b = layers[layer][hulls[layer][k - 1]], layers[layer][hulls[layer][k]]
        if spent + b.bits - a.bits <= budget:
            spent += b.bits - a.bits
            reached[layer] = k
            pick[layer] = hulls[layer][k]
    return pick


def score(
    weights: list[tuple[str, Callable[[], torch.Tensor]]], options: list[QuantConfig], progress: bool = True
) -> tuple[dict[str, list[Choice]], int]:
    """Each named weight (loaded one at a time) quantized at every one of ``options``: a row of
    choices per name, and how many weights there are. Weights that share a name (the experts of
    one module) are one unit: their rows summed, one setting for them all. Apart from
    :func:`choose` so that one scoring serves several budgets."""
    table: dict[str, list[Choice]] = {}
    total = 0
    for name, load in progress_bar(weights, desc="allocating bits", unit="tensor", disable=not progress):
        w = load()
        total += w.numel()
        # Scored without column scales: a Sinkhorn per outlier rule and group size would cost as
        # much as the rest of the scoring, for a plan no better (RESULTS.md, "Bits per layer").
        scored = rtn_errors(w, [replace(c, col_scale=False) for c in options], name)
        row = [
            Choice(8 * storage_bytes(w.shape, c.bits, c.group_size or w.shape[1], n, c.asymmetric, c.col_scale),
                   err * w.numel())
            for c, (err, n) in zip(options, scored, strict=True)
        ]  # fmt: skip
        if name in table:
            row = [Choice(a.bits + b.bits, a.error + b.error) for a, b in zip(table[name], row, strict=True)]
        table[name] = row
    return table, total


def choose(
    table: dict[str, list[Choice]], total: int, options: list[QuantConfig], target_bpw: float
) -> dict[str, QuantConfig]:
    """A setting from ``options`` for each unit of :func:`score`'s ``table``, the total within
    ``target_bpw`` bits per weight over all ``total`` weights."""
    rows = list(table.values())
    least = sum(min(c.bits for c in row) for row in rows) / max(total, 1)
    if target_bpw < least:
        raise EasyQuantError(
            f"target of {target_bpw:g} bits per weight is below the least these settings reach here ({least:.3f}); "
            "lower --bits or raise the target"
        )
    return {name: options[i] for name, i in zip(table, allocate(rows, target_bpw * total), strict=True)}


def plan(
    weights: list[tuple[str, Callable[[], torch.Tensor]]], base: QuantConfig, target_bpw: float, progress: bool = True
) -> dict[str, QuantConfig]:
    """A setting from :func:`menu` for each name of ``weights`` (weights that share one share it),
    the total within ``target_bpw`` bits per weight over them all."""
    options = menu(base)
    return choose(*score(weights, options, progress), options, target_bpw)
