"""The integer grid of symmetric k-bit quantization.

easyquant uses the two's-complement grid ``[-2^(k-1), 2^(k-1) - 1]`` ([-8, 7] at 4 bits):
every one of the 2^k codes is used, and it is the grid that int4 kernels and formats
(Marlin, compressed-tensors ``pack-quantized``) already serve. Its one asymmetry (one more
negative level) is turned into a gain rather than a loss: each row's scale carries a sign,
chosen so that the row's largest-magnitude weight falls on the longer, negative side
(:func:`oriented`). The paper prints [-7, 8], the mirror image of the same grid.

The asymmetric option uses the unsigned grid ``[0, 2^k - 1]`` with an integer zero point
``z`` per row or group: ``w = scale * (u - z)``. It fits rows whose kept weights are not
centred on zero, and 0 stays exactly representable (code ``z``), which keeps the many
near-zero weights unbiased: a free fp16 offset instead lowered the weight error but raised
SmolLM2's KL divergence, at 3 bits more than twofold. ``fractional_zero`` lets the zero point
move in steps of ``2^-(8-k)`` (still one byte), each step taken only where it lowers the range
solver's own loss: on weights already quantized once on another grid (Qwen's Q4_K_M source) that
is what lines the grids up. The symmetric grid is the case ``z = 2^(k-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EasyQuantError

MIN_BITS, MAX_BITS = 2, 8


def zero_shift(bits: int, fractional: bool) -> int:
    """Fractional bits of a stored (uint8) zero point: all the byte leaves over ``bits``, or 0."""
    return 8 - bits if fractional else 0


# Smallest positive fp16 (a subnormal): scales are stored in fp16 and must not round to 0.
FP16_TINY = 2.0**-24
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Grid:
    """The signed integer levels of a k-bit symmetric quantizer."""

    bits: int

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise EasyQuantError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(w / scale), qmin, qmax)`` (round half to even), as float."""
        return self.codes_(w / scale)

    def codes_(self, ratio: torch.Tensor) -> torch.Tensor:
        """:meth:`codes` from ``w / scale``, rounded and clamped in place."""
        return ratio.round_().clamp_(self.qmin, self.qmax)

    def fake_quant(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``Q[w] = scale * codes``: what the dequantized weight will be."""
        return scale * self.codes(w, scale)

    @property
    def top(self) -> int:
        """The largest unsigned code, ``2^k - 1``."""
        return (1 << self.bits) - 1

    def affine_codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Unsigned codes ``clamp(round(w / scale + zero), 0, 2^k - 1)`` of the asymmetric grid, as
        float; computed as ``round(w / scale + frac) + floor`` so that an integer zero point gives
        exactly ``round(w / scale) + zero``, ties included."""
        whole = zero.floor()
        return torch.clamp(torch.round(w / scale + (zero - whole)) + whole, 0, self.top)

    def affine_fake_quant(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``scale * (codes - zero)``: the dequantized weight of the asymmetric grid."""
        return scale * (self.affine_codes(w, scale, zero) - zero)


def ends(w: torch.Tensor, keep: torch.Tensor, turn: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's sign (+1 or -1) that turns its largest-magnitude kept weight negative (``turn``;
    else +1), and the magnitudes of its kept weights' two ends as turned: the longer (negative)
    side's, then the shorter's. One pass over ``w``; no grid needed (:func:`max_abs_scale`).

    Where the largest positive and negative weights tie in magnitude, the first of them in the
    row decides (so that negating a row negates its scale).
    """
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    kept = torch.where(keep, w, zero)
    lo, hi = kept.aminmax(dim=1)
    up, down = hi.clamp_min(0), (-lo).clamp_min(0)
    sign = torch.ones_like(up)
    if turn:
        sign = torch.where(up > down, -1.0, 1.0).to(w.dtype)
        tie = (up == down) & (up > 0)
        if bool(tie.any()):
            rows = kept[tie]
            peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            sign[tie] = torch.where(peak > 0, -1.0, 1.0).to(w.dtype)
    turned = sign < 0  # the longer (negative) side takes what was the positive end
    return sign, torch.where(turned, up, down), torch.where(turned, down, up)


def max_abs_scale(longer: torch.Tensor, shorter: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The smallest positive steps that clip neither end (:func:`ends`) on ``grid``; 1 for rows
    with nothing to quantize (all zero, or all outliers)."""
    s = torch.maximum(longer / -grid.qmin, shorter / grid.qmax)
    return torch.where(s > 0, s, torch.ones_like(s)).clamp_min(FP16_TINY)


def oriented(
    w: torch.Tensor, keep: torch.Tensor, grid: Grid, turn: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every range solver starts from: rows ``w`` turned (``turn``; else as they are) so that
    each row's largest-magnitude kept weight is negative, the signs (+1 or -1) that turned them,
    and their max-abs scales: the smallest steps that clip no kept weight.

    With the sign folded into the scale, a row's largest weight lands on the grid's longer side
    (``qmin``), which buys one more level where the row needs range most. Rows with nothing to
    quantize get scale 1; their codes are 0. One pass finds both ends of every row (:func:`ends`).
    """
    sign, longer, shorter = ends(w, keep, turn)
    return w * sign[:, None], sign, max_abs_scale(longer, shorter, grid)


def to_fp16_grid(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales to the fp16 values they will be stored as (never to zero)."""
    return s.clamp(FP16_TINY, FP16_MAX).half().float().clamp_min(FP16_TINY)


def zero_point(lo: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The integer zero point that puts the range's low end ``lo`` nearest code 0, within the grid."""
    return torch.round(-lo / s).clamp(0, grid.top)


def min_max(w: torch.Tensor, keep: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max start of the asymmetric grid: ``(scale, zero point)`` per row for the range of
    the kept weights widened to include 0 (so that the zero point lies on the grid). Rows with
    nothing to quantize get scale 1 and zero point 0."""
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    lo = torch.where(keep, w, zero).amin(dim=1).clamp_max(0)
    hi = torch.where(keep, w, zero).amax(dim=1).clamp_min(0)
    s = (hi - lo) / grid.top
    s = torch.where(s > 0, s, torch.ones_like(s)).clamp_min(FP16_TINY)
    return s, zero_point(lo, to_fp16_grid(s), grid)
