"""Splitting a weight matrix into quantization groups along its input columns.

A group is ``group_size`` consecutive columns of one row; per-channel quantization is the
case of one group spanning the whole row. When the group size does not divide the columns
(SmolLM2's 576 columns with groups of 128) the last group of each row is shorter: the
matrix is zero-padded to whole groups and the padding is marked as not kept, so it never
weighs in a loss nor is stored.
"""

from __future__ import annotations

import math

import torch

# Work on a matrix goes in blocks of about this many weights: on a CPU a block's temporaries stay
# in cache across the many passes over it and no temporary is the size of the matrix (whole
# 16M-weight matrices were 1.6x slower, blocks of 2^16-2^18 weights slower again from the cost of
# each torch call: bench/core.py on the development machine); a GPU is filled only by large ones.
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def block_elements(device: torch.device) -> int:
    return BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])


def group_count(cols: int, group_size: int) -> int:
    return math.ceil(cols / group_size)


def to_groups(x: torch.Tensor, group_size: int, fill: float | bool = 0) -> torch.Tensor:
    """Reshape ``(rows, cols)`` into ``(rows * n_groups, group_size)``, padding with ``fill``."""
    cols = x.shape[1]
    pad = group_count(cols, group_size) * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(-1, group_size)


def from_groups(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: drop the padding and restore ``(rows, cols)``."""
    return x.reshape(rows, -1)[:, :cols]
