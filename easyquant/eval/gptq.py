"""GPTQ (Frantar et al., 2022), the data-dependent quality bar, in compact form.

Follows the published algorithm and its reference implementation: per layer, the Hessian
``H = sum x x^T`` of the layer's inputs on calibration text; columns are quantized left to
right in blocks of 128, each column's error spread over the not-yet-quantized columns through
the upper Cholesky factor of ``H^-1`` (1% dampening). Blocks of the model are processed in
order, so each block sees the inputs that the already-quantized blocks before it produce.
It uses easyquant's symmetric grid, with each row's (or group's) scale chosen by GPTQ's own
MSE range search, and keeps no outliers: it is the bar EasyQuant is measured against, not
part of it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Cache

from ..core.grid import Grid
from ..core.solvers import GridSearch
from ..progress import progress_bar


def signed_scales(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-row scales of ``w`` by GPTQ's MSE range search, sign included (easyquant's grid)."""
    return GridSearch().solve_signed(w, torch.ones_like(w), grid)


def gptq_weight(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None, damp: float = 0.01, block: int = 128
) -> torch.Tensor:
    """The GPTQ-quantized (and dequantized) weight for input Hessian ``h``."""
    grid = Grid(bits)
    W = w.float().clone()
    cols = W.shape[1]
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    gs = group_size or cols
    Q = torch.zeros_like(W)
    scale = signed_scales(W, grid) if gs >= cols else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if gs < cols and (i1 + i) % gs == 0:
                scale = signed_scales(W[:, i1 + i : i1 + i + gs], grid)
            col = W1[:, i]
            q = scale * grid.codes(col, scale)
            Q[:, i1 + i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q.to(w.dtype)


Call = tuple[tuple, dict]  # a block's recorded arguments after the hidden states


def _block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """The first block's hidden states for each batch of 4 ``calib`` windows, and every block's
    other arguments, from one pass of the full-precision model. Masks and position embeddings
    depend on the tokens only, so they stay valid once earlier blocks are quantized (each block
    keeps its own: layers may differ, as sliding-window ones do). No cache is kept: a block
    called twice must not see its own keys twice."""
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in blocks]

    def record(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            rest = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            calls[i].append((args[1:], rest))

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    try:
        for x in calib.split(4):
            model(x.to(device), **no_cache)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _run(block: nn.Module, calls: list[Call], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """``block`` on each batch's ``hidden`` states with the rest of its recorded call; its outputs."""
    outs = []
    for (args, kwargs), h in zip(calls, hidden, strict=True):
        out = block(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.inference_mode()
def gptq_model(
    model: nn.Module, linears: list[tuple[str, nn.Linear]], calib: torch.Tensor, bits: int, group_size: int | None
) -> None:
    """Quantize ``linears`` of ``model`` in place with GPTQ, block by block, on ``calib`` windows:
    each block sees the inputs that the already-quantized blocks before it produce. The model runs
    once; each block then twice (for its Hessians, then quantized, for the next block's inputs)."""
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    hidden, calls = _block_inputs(model, blocks, calib)
    for block, block_calls in zip(
        progress_bar(blocks, desc="GPTQ blocks", unit="block", leave=False), calls, strict=True
    ):
        mine = [(n, m) for n, m in linears if any(m is x for x in block.modules())]
        hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mine}

        def collect(h: torch.Tensor):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                x = args[0].reshape(-1, mod.in_features).double().cpu()
                h.add_(x.T @ x)

            return hook

        handles = [m.register_forward_hook(collect(hessians[n])) for n, m in mine]
        try:
            if mine:
                _run(block, block_calls, hidden)
        finally:
            for h in handles:
                h.remove()
        for n, m in mine:
            m.weight.data = gptq_weight(m.weight.data, hessians[n], bits, group_size)
        hidden = _run(block, block_calls, hidden)
