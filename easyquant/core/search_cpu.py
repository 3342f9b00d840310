"""The range search of :class:`~easyquant.core.solvers.Search` fused for the CPU: every candidate
of a row (group) from one read of it.

In torch each loss evaluation is some eight passes over the whole block (divide, round, clamp,
subtract, power, weigh, sum), each memory-bound, and the search makes about twenty: on a CPU
that was over half the default's time. Here one compiled loop (numba, a thread per row range)
takes a row, keeps it in L1 while it tries the coarse scan, the fine scan around its two best
basins and the reweighted least-squares steps, and writes one scale. Same candidates, same
rounding to fp16, same strict acceptance as the torch path (which the GPU runs, and which the
tests hold this one to); only the order of each row's sum differs. For the norms 2 and 3 (the
default's): a general power does not run in SIMD lanes, and there torch was faster.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .grid import FP16_MAX, FP16_TINY

Row, F32 = np.ndarray, np.float32  # one row of fp32 values; an fp32 scalar
_TINY, _MAX, _NORMAL = np.float32(FP16_TINY), np.float32(FP16_MAX), np.float32(2.0**-14)
_SPLIT = np.float32(2.0**13 + 1)  # Veltkamp: fp32's 24 significant bits split into 11 and 13


@numba.njit
def _fp16(x: F32) -> F32:
    """``x`` clamped to fp16's positive range and rounded to the nearest fp16 value (ties to even),
    as ``to_fp16_grid``: below fp16's normal range to a multiple of its smallest step, above it
    by Veltkamp's split ``c - (c - x)``, ``c = (2^13 + 1) x`` (equal to fp16's own rounding on
    every fp32 value of a whole binade, ties included: checked exhaustively in the tests). No
    fast-math here: reassociation would fold the split to ``x``."""
    x = np.float32(min(max(np.float32(x), _TINY), _MAX))
    if x < _NORMAL:
        return max(np.float32(np.rint(x / _TINY) * _TINY), _TINY)
    c = x * _SPLIT
    return c - (c - x)


@numba.njit(fastmath={"reassoc"})  # reassociation lets the row's sum run in SIMD lanes
def _loss(w: Row, c: Row, sign: F32, s: F32, qmin: F32, qmax: F32, p: float) -> F32:
    """``|s|^p sum_j c_j |clamp(round(v_j / s)) - v_j / s|^p`` of one row turned by ``sign``
    (``v = sign * w``) for ``p`` 2 or 3, in fp32 like the torch path (``Objective.loss``). One
    loop per norm: a branch or a power inside the loop would stop it running in SIMD lanes."""
    acc = np.float32(0.0)
    if p == 3.0:
        for j in range(w.shape[0]):
            r = w[j] / s * sign
            d = min(max(np.rint(r), qmin), qmax) - r
            a = abs(d)
            acc += (a * a) * (a * c[j])
    else:
        for j in range(w.shape[0]):
            r = w[j] / s * sign
            d = min(max(np.rint(r), qmin), qmax) - r
            acc += (d * d) * c[j]
    return acc * (s * s * s if p == 3.0 else s * s)


@numba.njit(fastmath={"reassoc"})
def _fit(w: Row, c: Row, sign: F32, s: F32, qmin: F32, qmax: F32, p: float) -> F32:
    """The scale minimising the squared error with the codes at ``s`` held fixed, reweighted by
    ``|e|`` at ``s`` (IRLS) for ``p = 3`` (the torch path's ``_fit_scale``)."""
    num, den = np.float32(0.0), np.float32(0.0)
    floor = np.float32(1e-12) * s
    if p == 2.0:
        for j in range(w.shape[0]):
            v = w[j] * sign
            q = min(max(np.rint(v / s), qmin), qmax)
            cw = c[j] * q
            num += cw * v
            den += cw * q
    else:
        for j in range(w.shape[0]):
            v = w[j] * sign
            q = min(max(np.rint(v / s), qmin), qmax)
            cw = max(abs(q * s - v), floor) * c[j] * q
            num += cw * v
            den += cw * q
    fit = num / max(den, np.float32(1e-30)) if den > 0 else s
    return max(fit, np.float32(FP16_TINY))


@numba.njit
def _ends(w: Row, c: Row, qmin: F32, qmax: F32, turn: bool) -> tuple[F32, F32]:
    """A row's sign and max-abs scale, as ``grid.oriented`` (the kept weights: ``c > 0``)."""
    hi, lo = np.float32(0.0), np.float32(0.0)
    for j in range(w.shape[0]):
        if c[j] > 0:
            hi, lo = max(hi, w[j]), min(lo, w[j])
    up, down = hi, -lo
    sign = np.float32(-1.0 if turn and up > down else 1.0)
    if turn and up == down and up > 0:  # the first of the tied peaks decides
        for j in range(w.shape[0]):
            if c[j] > 0 and abs(w[j]) == up:
                sign = np.float32(-1.0 if w[j] > 0 else 1.0)
                break
    longer, shorter = (up, down) if sign < 0 else (down, up)
    s0 = max(longer / -qmin, shorter / qmax)
    return sign, max(s0 if s0 > 0 else np.float32(1.0), _TINY)


@numba.njit
def _row(w: Row, c: Row, losses: Row, turn: bool, qmin: F32, qmax: F32, p: float, shrinks: Row, offsets: Row,
         basins: int, refine: int) -> F32:  # fmt: skip
    """One row's signed scale: turned and started at max-abs, then the coarse shrinks, the fine
    offsets around the ``basins`` best coarse points, the least-squares steps; a candidate kept
    only where strictly better. ``losses``: room for the coarse points' losses."""
    coarse = shrinks.shape[0]
    sign, start = _ends(w, c, qmin, qmax, turn)
    best_s = np.float32(_fp16(start))
    best = _loss(w, c, sign, best_s, qmin, qmax, p)
    for k in range(coarse):
        s = np.float32(_fp16(start * shrinks[k]))
        loss = _loss(w, c, sign, s, qmin, qmax, p)
        losses[k] = loss
        if loss < best:
            best, best_s = loss, s
    for _ in range(min(basins, coarse)):  # around each of the row's best coarse points, best first
        at = 0
        for k in range(1, coarse):
            if losses[k] < losses[at]:
                at = k
        losses[at] = np.inf
        for u in offsets:
            s = np.float32(_fp16(start * np.float32(shrinks[at] + u)))
            loss = _loss(w, c, sign, s, qmin, qmax, p)
            if loss < best:
                best, best_s = loss, s
    for _ in range(refine):
        s = np.float32(_fp16(_fit(w, c, sign, best_s, qmin, qmax, p)))
        loss = _loss(w, c, sign, s, qmin, qmax, p)
        if loss < best:
            best, best_s = loss, s
    return best_s * sign


@numba.njit(parallel=True, cache=True)
def _search(w, c, turn, qmin, qmax, p, shrinks, offsets, basins, refine):
    """Every row's signed scale (:func:`_row`), rows shared among numba's threads."""
    out, losses = np.empty(w.shape[0], dtype=np.float32), np.empty((w.shape[0], shrinks.shape[0]), dtype=np.float32)
    for i in numba.prange(w.shape[0]):
        out[i] = _row(w[i], c[i], losses[i], turn, qmin, qmax, p, shrinks, offsets, basins, refine)
    return out


@numba.njit(cache=True)
def _search_serial(w, c, turn, qmin, qmax, p, shrinks, offsets, basins, refine):
    """:func:`_search` in the calling thread. A numba OpenMP pool beside torch's in each of several
    single-thread workers kept both spinning (``quantize --workers 2`` ran at 4.5 instead of 13
    Mweights/s on SmolLM2); numba's plain thread pool instead lost a third of the gain in one process."""
    out, losses = np.empty(w.shape[0], dtype=np.float32), np.empty(shrinks.shape[0], dtype=np.float32)
    for i in range(w.shape[0]):
        out[i] = _row(w[i], c[i], losses, turn, qmin, qmax, p, shrinks, offsets, basins, refine)
    return out


def search_signed(
    w: torch.Tensor,
    c: torch.Tensor,
    turn: bool,
    qmin: int,
    qmax: int,
    p: float,
    shrinks: torch.Tensor,
    offsets: torch.Tensor,
    basins: int,
    refine: int,
) -> torch.Tensor:
    """Signed scales ``(rows,)`` (fp32, fp16 values) for CPU rows ``w`` as they are, with
    importances ``c``, in the ``p``-norm (2 or 3; others run in torch): each row turned (``turn``)
    and started at max-abs as ``grid.oriented`` does, then the coarse ``shrinks`` of that start,
    ``offsets`` around each row's ``basins`` best, ``refine`` reweighted least-squares steps (see
    ``Search``)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)  # as torch is told
    wn, cn, shr, off = (t.detach().float().contiguous().numpy() for t in (w, c, shrinks, offsets))
    args = (wn, cn, turn, np.float32(qmin), np.float32(qmax), float(p), shr, off, basins, refine)
    if threads == 1:  # one thread (each of several workers): no thread pool of numba's beside torch's
        return torch.from_numpy(_search_serial(*args))
    numba.set_num_threads(threads)
    return torch.from_numpy(_search(*args))
