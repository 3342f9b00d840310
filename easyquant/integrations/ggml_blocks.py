"""llama.cpp's Q4_0, Q4_1 and Q8_0 blocks from a :class:`QuantizedWeight` (ggml-common.h layouts).

Each cuts a row into blocks of 32 weights with one fp16 scale ``d``. Q4_0 stores 16 bytes
of 4-bit codes ``q`` (weight ``d * (q - 8)``; byte ``j`` holds weight ``j`` in its low nibble
and weight ``j + 16`` in its high one); Q4_1 adds an fp16 minimum ``m`` after ``d`` (weight
``d * q + m``, same nibbles); Q8_0 stores 32 int8 codes (weight ``d * q``).
easyquant's grid ``[-2^(k-1), 2^(k-1) - 1]`` with signed fp16 scales is a subset of Q4_0's
for ``k <= 4`` and of Q8_0's for ``k <= 8``, so codes and scales carry over bit for bit
wherever a block lies inside one scale group. Its asymmetric grid ``s * (u - z)`` maps onto
Q4_1 for ``k <= 4`` with the same codes and scale and ``m = -s * z`` rounded to fp16 (an
error of at most 2^-11 of ``m``, a fraction of a percent of a step). Blocks that hold an fp16 outlier (which GGUF
cannot store), or that straddle two groups, are re-quantized from the reconstructed weights
with easyquant's own range solver on the block: the best block of the target type for those
32 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.quantize import QuantConfig, quantize_weight
from ..core.qweight import QuantizedWeight
from ..core.solvers import make_solver
from ..errors import EasyQuantError

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One of llama.cpp's 32-weight block types: its name, code bits and bytes per block."""

    name: str
    bits: int
    affine: bool = False  # a minimum per block beside the scale (unsigned codes)

    @property
    def head_bytes(self) -> int:
        return 4 if self.affine else 2

    @property
    def block_bytes(self) -> int:
        return self.head_bytes + BLOCK * self.bits // 8

    @property
    def qmin(self) -> int:
        return 0 if self.affine else -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return self.qmin + (1 << self.bits) - 1


Q4_0 = BlockType("Q4_0", 4)
Q4_1 = BlockType("Q4_1", 4, affine=True)
Q8_0 = BlockType("Q8_0", 8)


def block_type_for(bits: int, asymmetric: bool = False) -> BlockType:
    """The smallest block type whose grid holds ``bits``-bit codes (an asymmetric grid's exactly
    where one exists: Q4_1 up to 4 bits)."""
    if bits <= 4:
        return Q4_1 if asymmetric else Q4_0
    return Q8_0


def pack_blocks(codes: torch.Tensor, d: torch.Tensor, kind: BlockType, m: torch.Tensor | None = None) -> np.ndarray:
    """``(n, 32)`` codes on ``kind``'s grid, ``(n,)`` fp16 scales and (affine kinds) ``(n,)`` fp16
    minimums -> ``(n, block_bytes)`` uint8."""
    n = codes.shape[0]
    head = torch.stack([d, m] if kind.affine else [d], dim=1).to(torch.float16).contiguous()
    head = head.view(torch.uint8).view(n, kind.head_bytes)
    if kind.bits == 4:
        q = (codes.to(torch.int16) - kind.qmin).to(torch.uint8)
        body = q[:, : BLOCK // 2] | (q[:, BLOCK // 2 :] << 4)
    else:
        body = codes.to(torch.int8).view(torch.uint8)
    return torch.cat([head, body], dim=1).numpy()


def unpack_blocks(data: np.ndarray, kind: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of :func:`pack_blocks`: ``(codes (n, 32) int8, d (n,) fp16, m (n,) fp16 or None)``."""
    raw = torch.from_numpy(np.ascontiguousarray(data)).view(-1, kind.block_bytes)
    head = raw[:, : kind.head_bytes].contiguous().view(torch.float16)
    d, m = head[:, 0], head[:, 1] if kind.affine else None
    body = raw[:, kind.head_bytes :]
    if kind.bits == 4:
        q = torch.cat([body & 0x0F, body >> 4], dim=1)
        return q.to(torch.int8) + kind.qmin, d, m
    return body.contiguous().view(torch.int8), d, m


Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # codes, scales, minimums (affine kinds)


def _minimum(qw: QuantizedWeight) -> torch.Tensor:
    """Q4_1's fp16 minimum ``m = -s * z`` of easyquant's scales and zero points."""
    return (-qw.scales.float() * qw.zero_points()).half()


def _weights(block: Block) -> torch.Tensor:
    codes, d, m = block
    w = codes.float() * d.float()[:, None]
    return w if m is None else w + m.float()[:, None]


def best_blocks(x: torch.Tensor, kind: BlockType, kept: Block | None = None) -> Block:
    """The ``kind`` block (codes, fp16 scale, fp16 minimum for affine kinds) closest to each row
    of ``x`` ``(n, 32)`` by easyquant's default objective: its range solver on the block, or,
    where it does better, the block's own scale (and minimum) ``kept`` with ``x`` re-rounded
    onto them (an outlier clipped to the grid's end, the other 31 weights exact). The default
    objective (p = 3), not the squared error, because it keeps the large weights that matter
    most: on SmolLM2, p = 2 here lowered the weight error and raised the model's KL divergence."""
    config = QuantConfig(bits=kind.bits, group_size=None, n_sigma=None, asymmetric=kind.affine, col_scale=False)
    qw = quantize_weight(x.float(), config)
    new = (qw.codes(), qw.scales[:, 0], None if qw.zeros is None else _minimum(qw)[:, 0])
    if kept is None:
        return new
    _, d, m = kept
    safe = torch.where(d == 0, torch.ones_like(d), d).float()[:, None]
    shifted = x if m is None else x - m.float()[:, None]
    old = ((shifted / safe).round().clamp(kind.qmin, kind.qmax).to(new[0].dtype), d, m)
    cost = make_solver(config.solver).objective.error_cost
    better = (cost(_weights(old) - x).sum(1) < cost(_weights(new) - x).sum(1)) & (d != 0)
    return tuple(None if n is None else torch.where(better[:, None] if n.dim() == 2 else better, o, n)
                 for o, n in zip(old, new, strict=True))  # fmt: skip


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
    kind = kind or block_type_for(qw.bits, qw.asymmetric)
    if qw.bits > kind.bits:
        raise EasyQuantError(f"{qw.bits}-bit codes do not fit {kind.name}")
    rows, cols = qw.shape
    if cols % BLOCK:
        raise EasyQuantError(f"a {rows}x{cols} weight: llama.cpp blocks need a multiple of {BLOCK} columns")
    nb = cols // BLOCK
    codes = qw.codes().to(torch.int16).view(rows, nb, BLOCK)  # signed or unsigned, whichever grid

    def per_block(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(qw.group_size // BLOCK, dim=1)[:, :nb].clone()

    # Codes carry over where the grids agree and each block lies inside one scale group; a scale per
    # input column (dual-axis weights) has no place in a block: every block is solved again.
    exact = qw.asymmetric == kind.affine and qw.group_size % BLOCK == 0 and qw.col_scales is None
    redo = torch.full((rows, nb), not exact)
    d = per_block(qw.scales) if exact else torch.zeros(rows, nb, dtype=torch.float16)
    m = None
    if kind.affine:
        m = per_block(_minimum(qw)) if exact else torch.zeros(rows, nb, dtype=torch.float16)
    if qw.outlier_count:
        redo[qw.outlier_rows(), qw.outlier_cols.long() // BLOCK] = True
    if redo.any():
        x = qw.dequantize(torch.float32).view(rows, nb, BLOCK)[redo]
        kept = (codes[redo], d[redo], None if m is None else m[redo]) if exact else None
        new_codes, d[redo], new_m = best_blocks(x, kind, kept)
        codes[redo] = new_codes.to(codes.dtype)
        if m is not None:
            m[redo] = new_m
    flat = None if m is None else m.reshape(-1)
    data = pack_blocks(codes.reshape(-1, BLOCK), d.reshape(-1), kind, flat).reshape(rows, nb * kind.block_bytes)
    return Blocks(data, kind, rows * nb, int(redo.sum()))


def reconstruct(data: np.ndarray, kind: BlockType, shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight ``(rows, cols)`` that blocks stand for (llama.cpp's dequantization)."""
    return _weights(unpack_blocks(data, kind)).reshape(shape)
