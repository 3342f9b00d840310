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
cannot store), straddle two groups or sit under column scales are solved again from the
reconstructed weights (:mod:`easyquant.integrations.regroup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.qweight import QuantizedWeight
from ..errors import EasyQuantError
from .regroup import regroup

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
    g = regroup(qw, BLOCK, kind.bits, kind.affine)
    m = None if g.zeros is None else (-g.scales.float() * g.zeros).half().reshape(-1)
    data = pack_blocks(g.codes.reshape(-1, BLOCK), g.scales.reshape(-1), kind, m)
    return Blocks(data.reshape(rows, -1), kind, g.groups, g.requantized)


def reconstruct(data: np.ndarray, kind: BlockType, shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight ``(rows, cols)`` that blocks stand for (llama.cpp's dequantization)."""
    codes, d, m = unpack_blocks(data, kind)
    w = codes.float() * d.float()[:, None]
    return (w if m is None else w + m.float()[:, None]).reshape(shape)
