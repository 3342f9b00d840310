"""llama.cpp's Q4_0 and Q8_0 blocks from a :class:`QuantizedWeight` (ggml-common.h layouts).

Both cut each row into blocks of 32 weights with one fp16 scale ``d``. Q4_0 stores 16 bytes
of 4-bit codes ``q`` (weight ``d * (q - 8)``; byte ``j`` holds weight ``j`` in its low nibble
and weight ``j + 16`` in its high one); Q8_0 stores 32 int8 codes (weight ``d * q``).
easyquant's grid ``[-2^(k-1), 2^(k-1) - 1]`` with signed fp16 scales is a subset of Q4_0's
for ``k <= 4`` and of Q8_0's for ``k <= 8``, so codes and scales carry over bit for bit
wherever a block lies inside one scale group. Blocks that hold an fp16 outlier (which GGUF
cannot store), or that straddle two groups, are re-quantized from the reconstructed weights
with easyquant's own range solver on the block: the best block of the target type for those
32 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import EasyQuantError
from .quantize import QuantConfig, quantize_weight
from .qweight import QuantizedWeight
from .solvers import make_solver

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One of llama.cpp's 32-weight block types: its name, code bits and bytes per block."""

    name: str
    bits: int

    @property
    def block_bytes(self) -> int:
        return 2 + BLOCK * self.bits // 8

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))


Q4_0 = BlockType("Q4_0", 4)
Q8_0 = BlockType("Q8_0", 8)


def block_type_for(bits: int) -> BlockType:
    """The smallest block type whose grid holds ``bits``-bit codes."""
    return Q4_0 if bits <= Q4_0.bits else Q8_0


def pack_blocks(codes: torch.Tensor, d: torch.Tensor, kind: BlockType) -> np.ndarray:
    """``(n, 32)`` signed codes on ``kind``'s grid and ``(n,)`` fp16 scales -> ``(n, block_bytes)`` uint8."""
    n = codes.shape[0]
    head = d.to(torch.float16).contiguous().view(torch.uint8).view(n, 2)
    if kind is Q4_0:
        q = (codes.to(torch.int16) - kind.qmin).to(torch.uint8)
        body = q[:, : BLOCK // 2] | (q[:, BLOCK // 2 :] << 4)
    else:
        body = codes.to(torch.int8).view(torch.uint8)
    return torch.cat([head, body], dim=1).numpy()


def unpack_blocks(data: np.ndarray, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_blocks`: ``(codes (n, 32) int8, d (n,) fp16)``."""
    raw = torch.from_numpy(np.ascontiguousarray(data)).view(-1, kind.block_bytes)
    d = raw[:, :2].contiguous().view(torch.float16).view(-1)
    if kind is Q4_0:
        body = raw[:, 2:]
        q = torch.cat([body & 0x0F, body >> 4], dim=1)
        return q.to(torch.int8) + kind.qmin, d
    return raw[:, 2:].contiguous().view(torch.int8), d


def best_blocks(
    x: torch.Tensor, kind: BlockType, kept: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kind`` block (codes, fp16 scale) closest to each row of ``x`` ``(n, 32)`` by
    easyquant's default objective: its range solver on the block, or, where it does better,
    the block's own codes and scale ``kept`` with ``x`` re-rounded onto them (an outlier
    clipped to the grid's end, the other 31 weights exact). The default objective (p = 3),
    not the squared error, because it keeps the large weights that matter most: on SmolLM2,
    p = 2 here lowered the weight error and raised the model's KL divergence."""
    config = QuantConfig(bits=kind.bits, n_sigma=None)
    qw = quantize_weight(x.float(), config)
    codes, d = qw.codes(), qw.scales[:, 0]
    if kept is not None:
        old_d = kept[1]
        safe = torch.where(old_d == 0, torch.ones_like(old_d), old_d).float()[:, None]
        old_codes = (x / safe).round().clamp(kind.qmin, -kind.qmin - 1).to(codes.dtype)
        cost = make_solver(config.solver).objective.error_cost
        err = lambda c, s: cost(c.float() * s.float()[:, None] - x).sum(1)  # noqa: E731
        better = (err(old_codes, old_d) < err(codes, d)) & (old_d != 0)
        codes[better], d[better] = old_codes[better], old_d[better]
    return codes, d


@dataclass(frozen=True)
class Blocks:
    """A weight as ``kind`` blocks, ``(rows, cols // 32 * block_bytes)`` uint8, and how many
    of its blocks were re-quantized (the rest carry easyquant's codes and scales exactly)."""

    data: np.ndarray
    kind: BlockType
    blocks: int
    requantized: int


def to_blocks(qw: QuantizedWeight, kind: BlockType | None = None) -> Blocks:
    """``qw`` in llama.cpp blocks (default: the smallest type holding its codes exactly)."""
    kind = kind or block_type_for(qw.bits)
    if qw.bits > kind.bits:
        raise EasyQuantError(f"{qw.bits}-bit codes do not fit {kind.name}")
    rows, cols = qw.shape
    if cols % BLOCK:
        raise EasyQuantError(f"a {rows}x{cols} weight: llama.cpp blocks need a multiple of {BLOCK} columns")
    nb = cols // BLOCK
    codes = qw.codes().view(rows, nb, BLOCK)
    redo = torch.zeros(rows, nb, dtype=torch.bool)
    if qw.group_size % BLOCK == 0:
        d = qw.scales.repeat_interleave(qw.group_size // BLOCK, dim=1)[:, :nb].clone()
    else:  # a block straddles two scale groups
        d = torch.zeros(rows, nb, dtype=torch.float16)
        redo[:] = True
    if qw.outlier_count:
        redo[qw.outlier_rows(), qw.outlier_cols.long() // BLOCK] = True
    if redo.any():
        x = qw.dequantize(torch.float32).view(rows, nb, BLOCK)[redo]
        kept = None if qw.group_size % BLOCK else (codes[redo], d[redo])
        codes[redo], d[redo] = best_blocks(x, kind, kept)
    data = pack_blocks(codes.reshape(-1, BLOCK), d.reshape(-1), kind).reshape(rows, nb * kind.block_bytes)
    return Blocks(data, kind, rows * nb, int(redo.sum()))


def reconstruct(data: np.ndarray, kind: BlockType, shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight ``(rows, cols)`` that blocks stand for (llama.cpp's dequantization)."""
    codes, d = unpack_blocks(data, kind)
    return (codes.float() * d.float()[:, None]).reshape(shape)
