"""Tile sizes and launch parameters of the Triton kernels, chosen from the shape on the host
(no Triton needed): :class:`KernelConfig`, :func:`default_config`, and when a weight's outliers
go to the balanced kernel (:func:`outlier_mode`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...core.qweight import QuantizedWeight
from ...errors import EasyQuantError

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# "fused": each tile adds its own rows' outliers; "balanced": a second kernel gives every program
# the same number of outliers, whatever rows they fall on, and adds them atomically.
OUTLIER_MODES = ("fused", "balanced")
# Real weights crowd their outliers into some rows (RESULTS.md: up to 5x the mean per 64-row
# tile on SmolLM2); past this ratio a fused tile would keep its program busy that much longer.
BALANCE_ABOVE = 2.0


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters; :func:`default_config` picks them from the shape."""

    block_m: int
    block_n: int
    block_k: int
    block_nnz: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    outliers: str = "fused"  # or "balanced": see OUTLIER_MODES

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "block_nnz"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise EasyQuantError(f"KernelConfig.{name} must be a power of two, got {v}")
        if self.block_n < 16 or self.block_k < 16 or self.block_nnz < 16:
            raise EasyQuantError("KernelConfig: block_n, block_k and block_nnz must be at least 16")
        if 1 < self.block_m < 16:  # tensor-core tiles need 16 rows; one row takes the GEMV path
            raise EasyQuantError(f"KernelConfig.block_m must be 1 or at least 16, got {self.block_m}")
        if self.split_k < 1:
            raise EasyQuantError(f"KernelConfig.split_k must be at least 1, got {self.split_k}")
        if self.outliers not in OUTLIER_MODES:
            raise EasyQuantError(f"KernelConfig.outliers must be one of {OUTLIER_MODES}, got {self.outliers!r}")

    def __str__(self) -> str:
        return (f"m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} "
                f"st{self.num_stages}")  # fmt: skip


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors, which :func:`default_config` sizes split-K for."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises split-K


def tile_skew(qw: QuantizedWeight, block_n: int = 64) -> float:
    """Outliers in the busiest ``block_n``-row tile over the mean tile (1.0 with none).
    Reads the row pointers: a device sync."""
    if qw.outlier_count == 0:
        return 1.0
    ptr = qw.outlier_rowptr
    edges = torch.cat([ptr[::block_n], ptr[-1:]]) if (len(ptr) - 1) % block_n else ptr[::block_n]
    per_tile = torch.diff(edges.long()).float()
    return (per_tile.max() / per_tile.mean()).item()


def outlier_mode(qw: QuantizedWeight, block_n: int = 64) -> str:
    """``"balanced"`` when :func:`tile_skew` is over ``BALANCE_ABOVE``, else ``"fused"``.
    Decide once per weight, as :class:`~easyquant.runtime.nn.EasyQuantLinear` does."""
    return "balanced" if tile_skew(qw, block_n) > BALANCE_ABOVE else "fused"


def cdiv(a: int, b: int) -> int:  # triton.cdiv is a jit function: 2.5 us a call from the host
    return -(-a // b)


def fit_block_k(block_k: int, group: int) -> int:
    """``block_k``, or the power-of-two ``group`` (at least 16) when smaller: then every K block
    lies inside one scale group and loads one scale per row instead of one per element."""
    if 16 <= group < block_k and group & (group - 1) == 0:
        return group
    return block_k


@functools.cache  # called on every forward: keep it off the decode path's CPU time
def default_config(m: int, n: int, k: int, sms: int, outliers: str = "fused", group: int = 0) -> KernelConfig:
    """Decode shapes (few rows): thin tiles and split-K until about two waves of programs on
    ``sms`` multiprocessors; prefill shapes: square tensor-core tiles. K blocks shrink to fit
    inside one scale group of ``group`` columns (a weight's ``group_size``; 0: no limit).

    The shapes follow what the compiler makes of them for sm_90 (bench/results/compiled.md):
    one-row tiles of 32 x 256 with 64 codes per thread (4 warps; 2 when groups cut K to 128)
    are software-pipelined with 128-bit async copies and need almost no warp shuffles, where
    64 x 128 tiles spent hundreds; tensor-core tiles take outliers 16 at a time (32 spilled).
    GPU timings are to confirm them: bench/tune.py."""
    if m == 1:
        block_m, block_n, block_k = 1, 32, 256
    elif m <= 32:
        block_m, block_n, block_k = 16 if m <= 16 else 32, 64, 128
    else:
        block_m, block_n, block_k = 64, 64, 64
    block_k = fit_block_k(block_k, group)
    tiles = max(1, cdiv(m, block_m) * cdiv(n, block_n))
    split = max(1, min(2 * sms // tiles, cdiv(k, block_k), 16))
    if block_m == 1:  # 64 codes per thread
        warps = max(1, block_n * block_k // 2048)
        return KernelConfig(1, block_n, block_k, 32, split, num_warps=warps, outliers=outliers)
    return KernelConfig(block_m, block_n, block_k, 16, split, outliers=outliers)
