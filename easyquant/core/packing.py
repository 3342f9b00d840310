"""Dense bit-packing of unsigned k-bit codes, row by row.

Layout: each row's codes are taken 8 at a time (the row is zero-padded to a multiple of 8)
and written as one little-endian bit stream of ``k`` bytes: code ``i`` of the block occupies
bits ``[k*i, k*i + k)``. At 4 bits this is the usual two codes per byte, low nibble first
(byte ``j`` = ``c[2j] | c[2j+1] << 4``); at 2 bits four per byte; at 3 bits eight codes in
three bytes. A ``(rows, cols)`` matrix packs to ``(rows, ceil(cols / 8) * k)`` uint8.
"""

from __future__ import annotations

import math

import torch


def packed_cols(cols: int, bits: int) -> int:
    return math.ceil(cols / 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, cols)`` unsigned codes in ``[0, 2^bits)`` into uint8."""
    rows, cols = codes.shape
    blocks = math.ceil(cols / 8)
    if 8 % bits == 0:  # whole codes per byte, lowest bits first: byte-wide shifts and ors
        x = torch.nn.functional.pad(codes.to(torch.uint8), (0, blocks * 8 - cols)).view(rows, -1, 8 // bits)
        out = x[..., 0].clone()
        for i in range(1, 8 // bits):
            out |= x[..., i] << (bits * i)
        return out
    x = torch.nn.functional.pad(codes.to(torch.int64), (0, blocks * 8 - cols)).view(rows, blocks, 8)
    shifts = torch.arange(8, device=codes.device) * bits
    stream = (x << shifts).sum(dim=2, keepdim=True)
    out = (stream >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(rows, blocks * bits)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(rows, cols)`` uint8 codes."""
    rows = packed.shape[0]
    if 8 % bits == 0:  # whole codes per byte, lowest bits first: byte-wide shifts, no int64 temporaries
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1).reshape(rows, -1)
        return codes if codes.shape[1] == cols else codes[:, :cols].contiguous()
    # Each block of `bits` bytes as one integer (24 bits fit int32 at 3 bits), then 8 shifts.
    wide = torch.int32 if bits <= 3 else torch.int64
    x = packed.to(wide).view(rows, -1, bits)
    stream = sum(x[..., i] << (8 * i) for i in range(bits))
    codes = torch.stack([(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(8)], dim=-1)
    return codes.to(torch.uint8).reshape(rows, -1)[:, :cols]
