"""The paper's questions, each answered by a table (markdown + JSON) and a plot.

- ``nsigma``: n from 2 to 6 and no outliers: outlier fraction, weight error, KL divergence.
- ``ablation``: outlier isolation only, range optimisation only, both (paper and search solvers).
- ``outliers``: the outlier fraction by module type (q, k, v, o, gate, up, down) and by layer.
- ``range``: the paper's Adam range against its step for one layer, and how far its loss is
  from the best a dense search finds (and from the ``search`` solver's).
The first two are :func:`easyquant.eval.compare.compare` runs over preset method lists.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..core.grid import Grid, oriented, to_fp16_grid
from ..core.objective import Objective
from ..core.outliers import sigma_mask
from ..core.solvers import PaperAdam, Search
from .plots import save_plot

# The paper's questions, asked of the paper's per-channel shape (no groups, no column scales).
CHANNEL = "easyquant:group_size=none/col_scale=false"
NSIGMA_METHODS = [f"{CHANNEL}/n_sigma={n}" for n in ("none", 2, 2.5, 3, 4, 5, 6)]
ABLATION_METHODS = [
    "rtn",  # neither
    f"{CHANNEL}/n_sigma=3/solver=rtn",  # outlier isolation only
    f"{CHANNEL}/solver=paper/n_sigma=none",  # range optimisation only (paper)
    f"{CHANNEL}/solver=search/n_sigma=none",  # range optimisation only (search)
    "paper",  # both, the paper's recipe
    "easyquant-channel",  # both, easyquant's solver
]


def _layer_and_type(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1), name.rsplit(".", 1)[-1]


def outlier_map(
    linears: list[tuple[str, nn.Linear]], n_sigma: float, scope: str = "tensor", tile_rows: int = 64
) -> dict:
    """Outlier fraction of every linear, grouped by module type and by layer; and, by module
    type, how unevenly they fall on output rows and on tiles of ``tile_rows`` rows (the GPU
    kernel's unit of work): mean and largest count per row, largest tile over the mean tile."""
    cells: dict[tuple[int, str], float] = {}
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    rows: dict[str, dict[str, float]] = defaultdict(lambda: {"rows": 0, "max_row": 0, "max_tile_over_mean": 0.0})
    for name, lin in linears:
        w = lin.weight.data.float()
        per_row = sigma_mask(w, n_sigma, scope).sum(dim=1)
        n = int(per_row.sum())
        layer, kind = _layer_and_type(name)
        cells[(layer, kind)] = n / w.numel()
        for acc in (by_type[kind], by_layer[layer]):
            acc[0] += n
            acc[1] += w.numel()
        tiles = torch.nn.functional.pad(per_row, (0, -len(per_row) % tile_rows)).view(-1, tile_rows).sum(1).float()
        r = rows[kind]
        r["rows"] += len(per_row)
        r["max_row"] = max(r["max_row"], int(per_row.max()))
        if n:
            r["max_tile_over_mean"] = max(r["max_tile_over_mean"], (tiles.max() / tiles.mean()).item())
    per_row_stats = {k: {**r, "mean_row": by_type[k][0] / r["rows"]} for k, r in rows.items()}
    return {
        "cells": {f"{layer}:{kind}": f for (layer, kind), f in cells.items()},
        "by_type": {k: n / t for k, (n, t) in by_type.items()},
        "by_layer": {k: n / t for k, (n, t) in sorted(by_layer.items())},
        "rows_by_type": per_row_stats,
        "tile_rows": tile_rows,
    }


def outliers_report(linears: list[tuple[str, nn.Linear]], n_sigma: float, out: Path, title: str) -> str:
    res = outlier_map(linears, n_sigma)
    out.mkdir(parents=True, exist_ok=True)
    (out / "outliers.json").write_text(json.dumps(res, indent=1))
    types = list(res["by_type"])
    layers = list(res["by_layer"])
    lines = [
        f"| module type | outlier fraction | outliers per row: mean | max "
        f"| largest {res['tile_rows']}-row tile / mean |",
        "|---|---|---|---|---|",
    ]
    for k, v in res["by_type"].items():
        r = res["rows_by_type"][k]
        lines.append(f"| {k} | {v:.3%} | {r['mean_row']:.1f} | {r['max_row']} | {r['max_tile_over_mean']:.2f} |")
    lines += ["", "| layer | " + " | ".join(types) + " | all |", "|---" * (len(types) + 2) + "|"]
    for layer in layers:
        cells = [res["cells"].get(f"{layer}:{t}") for t in types]
        lines.append(
            f"| {layer} | "
            + " | ".join("-" if c is None else f"{c:.2%}" for c in cells)
            + f" | {res['by_layer'][layer]:.2%} |"
        )
    table = "\n".join(lines)
    (out / "outliers.md").write_text(f"{title}\n\n{table}\n")

    def draw(fig, ax) -> None:
        grid = torch.tensor([[res["cells"].get(f"{layer}:{t}", float("nan")) * 100 for t in types] for layer in layers])
        im = ax.imshow(grid.T, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(types)), types)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, label="outliers (% of weights)")

    save_plot(out / "outliers.png", draw, title)
    return table


def range_trace(w: torch.Tensor, bits: int, lr: float, steps: int, p: float = 2.0) -> dict:
    """The paper's Adam on every row of ``w`` (no outliers): mean range and loss per step, against
    the ``search`` solver and a 2000-point dense scan of each row's range."""
    grid, obj = Grid(bits), Objective(p)
    keep = torch.ones_like(w, dtype=torch.bool)
    wo, _, s0 = oriented(w.float(), keep, grid)
    c = keep.float()
    k = -grid.qmin
    ranges, losses = [], []

    def trace(t: int, r: torch.Tensor) -> None:
        ranges.append((r / (s0 * k)).mean().item())
        losses.append(obj.loss(wo, c, to_fp16_grid(r / k), grid).sum().item())

    PaperAdam(obj, lr=lr, steps=steps, trace=trace).solve(wo, c, s0, grid)
    dense = obj.loss(wo, c, to_fp16_grid(s0), grid)
    for t in torch.linspace(0.05, 1.0, 2000).tolist():
        dense = torch.minimum(dense, obj.loss(wo, c, to_fp16_grid(s0 * t), grid))
    return {
        "start_loss": obj.loss(wo, c, to_fp16_grid(s0), grid).sum().item(),
        "relative_range": ranges,
        "loss": losses,
        "search_loss": obj.loss(wo, c, Search(obj).solve(wo, c, s0, grid), grid).sum().item(),
        "dense_loss": dense.sum().item(),
    }


def range_report(w: torch.Tensor, bits: int, lr: float, steps: int, out: Path, title: str) -> str:
    res = range_trace(w, bits, lr, steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "range.json").write_text(json.dumps(res, indent=1))
    best = res["dense_loss"]
    marks = sorted({s for s in (1, 10, 50, 100, 200, 500, 1000, steps) if s <= steps})
    lines = [
        "| solver | step | range / max-abs range (mean) | loss | loss / dense-search best |",
        "|---|---|---|---|---|",
    ]
    lines.append(f"| max-abs start | 0 | 1.000 | {res['start_loss']:.5g} | {res['start_loss'] / best:.4f} |")
    for s in marks:
        lines.append(
            f"| paper (Adam, lr {lr:g}) | {s} | {res['relative_range'][s - 1]:.3f} | {res['loss'][s - 1]:.5g} | "
            f"{res['loss'][s - 1] / best:.4f} |"
        )
    lines.append(f"| search | - | - | {res['search_loss']:.5g} | {res['search_loss'] / best:.4f} |")
    lines.append(f"| dense scan (2000 points) | - | - | {best:.5g} | 1.0000 |")
    table = "\n".join(lines)
    (out / "range.md").write_text(f"{title}\n\n{table}\n")

    def draw(fig, ax) -> None:
        ax.plot(range(1, steps + 1), [x / best for x in res["loss"]], label="paper (Adam)")
        ax.axhline(res["search_loss"] / best, color="C1", ls="--", label="search")
        ax.axhline(1.0, color="k", ls=":", label="dense-scan best")
        ax.set_xlabel("Adam step")
        ax.set_ylabel("squared error / best")
        ax.set_xscale("log")
        ax.legend()

    save_plot(out / "range.png", draw, title)
    return table
