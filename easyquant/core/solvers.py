"""Range solvers: one class per strategy for choosing each row's (or group's) scale.

Every solver sees oriented rows (largest-magnitude kept weight negative, see
:func:`easyquant.core.grid.oriented`), their importances ``c`` (0 = not quantized), and the max-abs
scale ``s0``; it returns positive scales already rounded to fp16, the values that will be
stored, so that the loss it reports is the loss the checkpoint has. Rows are independent:
every solver is vectorised over all rows at once, on whatever device the rows are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .grid import FP16_TINY, Grid, min_max, oriented, to_fp16_grid, zero_point
from .objective import Objective


@dataclass(frozen=True)
class RangeSolver(ABC):
    objective: Objective = field(default_factory=Objective)

    @abstractmethod
    def solve(self, w: torch.Tensor, c: torch.Tensor, s0: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Scales ``(rows,)`` for rows ``w`` ``(rows, cols)`` with importances ``c``."""

    def solve_signed(self, w: torch.Tensor, c: torch.Tensor, grid: Grid, turn: bool = True) -> torch.Tensor:
        """Scales ``(rows,)``, sign included, for rows ``w`` as they are: turned so that each row's
        largest kept weight lands on the grid's longer side (``turn``), started at max-abs, solved."""
        wo, sign, s0 = oriented(w, c > 0, grid, turn)
        return self.solve(wo, c, s0, grid) * sign


class MaxAbs(RangeSolver):
    """Round-to-nearest with the max-abs range: the RTN baseline."""

    def solve(self, w: torch.Tensor, c: torch.Tensor, s0: torch.Tensor, grid: Grid) -> torch.Tensor:
        return to_fp16_grid(s0)


class _Best:
    """The best parameters seen so far per row (a scale, or a scale and an offset, each rounded
    to what will be stored); a candidate replaces them only where it is strictly better."""

    def __init__(self, loss: Callable[..., torch.Tensor], round_: Callable[..., tuple], *params: torch.Tensor):
        self._loss, self._round = loss, round_
        self.params = round_(*params)
        self.loss = loss(*self.params)

    @property
    def s(self) -> torch.Tensor:
        return self.params[0]

    def consider(self, *params: torch.Tensor) -> torch.Tensor:
        """Keep ``params`` where they beat the best so far; return their loss."""
        params = self._round(*params)
        loss = self._loss(*params)
        better = loss < self.loss
        self.params = tuple(torch.where(better, new, old) for new, old in zip(params, self.params, strict=True))
        self.loss = torch.where(better, loss, self.loss)
        return loss


Work = tuple[torch.Tensor, torch.Tensor]


def _work(w: torch.Tensor) -> Work:
    """Two buffers of ``w``'s shape, reused by every loss evaluation of one solve."""
    return torch.empty_like(w), torch.empty_like(w)


def _scale_best(
    w: torch.Tensor, c: torch.Tensor, grid: Grid, objective: Objective, s: torch.Tensor, work: Work
) -> _Best:
    return _Best(lambda s: objective.loss(w, c, s, grid, work), lambda s: (to_fp16_grid(s),), s)


@dataclass(frozen=True)
class GridSearch(RangeSolver):
    """GPTQ's range search (``quant.py``, ``mse=True``): shrink the max-abs range by
    ``1 - i/steps`` for ``i < max_shrink * steps`` and keep the best. The RTN+MSE baseline."""

    objective: Objective = field(default_factory=lambda: Objective(p=2.4))
    steps: int = 100
    max_shrink: float = 0.8

    def solve(self, w: torch.Tensor, c: torch.Tensor, s0: torch.Tensor, grid: Grid) -> torch.Tensor:
        best = _scale_best(w, c, grid, self.objective, s0, _work(w))
        for i in range(1, int(self.max_shrink * self.steps)):
            best.consider(s0 * (1 - i / self.steps))
        return best.s


@dataclass(frozen=True)
class PaperAdam(RangeSolver):
    """The paper's recipe: Adam (``torch.optim.Adam``) on the range ``r = s * 2^(k-1)`` from
    the max-abs start, with the exact clamped gradient, taking the range at the last step.

    Defaults are the paper's BLOOM setting (lr 1e-3, 100 steps); its LLaMA setting is
    lr 1e-4, 500 steps. Deterministic: no randomness, fixed step count.
    """

    objective: Objective = field(default_factory=Objective)
    lr: float = 1e-3
    steps: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trace: Callable[[int, torch.Tensor], None] | None = None

    def solve(self, w: torch.Tensor, c: torch.Tensor, s0: torch.Tensor, grid: Grid) -> torch.Tensor:
        k = float(-grid.qmin)
        r = (s0 * k).clone().requires_grad_()
        # torch's own Adam, single-tensor form (the same arithmetic on every device).
        adam = torch.optim.Adam([r], lr=self.lr, betas=self.betas, eps=self.eps, foreach=False)
        for t in range(1, self.steps + 1):
            r.grad = self.objective.grad(w, c, r.detach() / k, grid) / k
            adam.step()
            with torch.no_grad():
                r.clamp_(min=FP16_TINY * k)
            if self.trace is not None:
                self.trace(t, r.detach())
        return to_fp16_grid(r.detach() / k)


# The least shrink of max-abs the scan tries, by bit width, for rows of a group's length: the best
# scale of groups of 64 (column scales on, 4-sigma outliers out; MiniLM, SmolLM2 and Student-t
# weights, 200-point scans) lay above 0.69 of max-abs at 4 bits and above 0.50 at 3 in all but 1
# of 10^4 groups; earlier scans of heavy-tailed groups put 2 bits above 0.41. Wider bit widths
# clip less. Longer rows (per channel) hold rarer extremes, and the squared error clips them
# hard: their best scales lie down to a fifth of max-abs.
LEAST_SHRINK = {2: 0.2, 3: 0.45, 4: 0.6}
LEAST_SHRINK_WIDE, LEAST_SHRINK_LONG, LONG_ROW = 0.7, 0.2, 256


def least_shrink(bits: int, cols: int) -> float:
    return LEAST_SHRINK_LONG if cols > LONG_ROW else LEAST_SHRINK.get(bits, LEAST_SHRINK_WIDE)


FUSED_NORMS = (2.0, 3.0)  # the norms the CPU search is compiled for (a general power does not vectorise)


@dataclass(frozen=True)
class Search(RangeSolver):
    """easyquant's solver: a coarse scan of the range, a fine scan around each row's two best,
    then a few reweighted least-squares steps (exact for ``p = 2``, IRLS otherwise).

    The coarse scan finds the right basin of ``L(s)``, which has many local minima that
    trap gradient descent; the fine scan and the closed-form steps land on the basin's
    floor. Each candidate is accepted only if it lowers the loss at its stored fp16 value,
    so the result is never worse than the max-abs start. The scan spans the shrinks of max-abs
    where the best scales lie (:func:`least_shrink`, or from ``min_shrink``) in steps of about
    ``step``: for the default's groups of 64 at 4 bits 8 coarse and 8 fine candidates and 3
    steps, whose total loss on real weights was below a 200-point scan's (RESULTS.md,
    "Quantization speed: the search in steps of the grid"). On a CPU, :meth:`solve_signed` runs
    the whole search fused, every candidate of a row from one read of it
    (:mod:`easyquant.core.search_cpu`; norms 2 and 3); ``fused=False`` (and :meth:`solve`) run it
    in torch, as on a GPU.
    """

    objective: Objective = field(default_factory=lambda: Objective(p=3.0))
    step: float = 0.06
    min_shrink: float | None = None
    basins: int = 2
    fine: int = 4
    refine: int = 3
    fused: bool = True

    def solve_signed(self, w: torch.Tensor, c: torch.Tensor, grid: Grid, turn: bool = True) -> torch.Tensor:
        if not (self.fused and w.device.type == "cpu" and self.objective.p in FUSED_NORMS):
            return super().solve_signed(w, c, grid, turn)
        from . import search_cpu  # numba: imported where it runs, not with the package

        least, coarse = self._span(grid, w.shape[1])
        shrinks, offsets = _scan_points(least, coarse, self.fine, w)
        p, basins, refine = self.objective.p, self.basins, self.refine
        return search_cpu.search_signed(w, c, turn, grid.qmin, grid.qmax, p, shrinks, offsets, basins, refine)

    def _span(self, grid: Grid, cols: int) -> tuple[float, int]:
        """The least shrink the scan tries and its count of coarse points."""
        least = least_shrink(grid.bits, cols) if self.min_shrink is None else self.min_shrink
        return least, round((1 - least) / self.step) + 1

    def solve(self, w: torch.Tensor, c: torch.Tensor, s0: torch.Tensor, grid: Grid) -> torch.Tensor:
        least, coarse = self._span(grid, w.shape[1])
        work = _work(w)
        best = _scale_best(w, c, grid, self.objective, s0, work)
        _scan(best, lambda t: (s0 * t,), s0, coarse, least, self.basins, self.fine)
        q, spare = work
        for _ in range(self.refine):
            grid.codes_(torch.div(w, best.s[:, None], out=q))
            best.consider(_fit_scale(w, c, best.s, q, self.objective.p, spare))
        return best.s


def _scan(
    best: _Best,
    candidate: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    like: torch.Tensor,
    coarse: int,
    min_shrink: float,
    basins: int,
    fine: int,
) -> None:
    """Offer ``best`` the candidates of ``coarse`` shrink factors from ``min_shrink`` to 1, then
    ``fine`` more around each row's ``basins`` best (two near-equal basins are common at 3 bits)."""
    shrinks, offsets = _scan_points(min_shrink, coarse, fine, like)
    losses = torch.stack([best.consider(*candidate(t)) for t in shrinks.tolist()])
    centres = shrinks[losses.topk(min(basins, coarse), dim=0, largest=False).indices]
    for centre in centres:
        for u in offsets.tolist():
            best.consider(*candidate(centre + u))


def _scan_points(min_shrink: float, coarse: int, fine: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan's ``coarse`` shrinks from ``min_shrink`` to 1 and the ``fine`` offsets tried
    around a basin's (within one coarse step either side, ends excluded)."""
    shrinks = torch.linspace(min_shrink, 1, coarse, dtype=like.dtype, device=like.device)
    step = (1 - min_shrink) / max(coarse - 1, 1)
    return shrinks, torch.linspace(-step, step, fine + 2, dtype=like.dtype)[1:-1]


def _fit_scale(
    w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, q: torch.Tensor, p: float, spare: torch.Tensor | None = None
) -> torch.Tensor:
    """With the codes' levels ``q`` (the multiples of the scale) held fixed, the scale minimising
    the squared error, reweighted by ``|e|^(p-2)`` at the current scale ``s`` (IRLS) for ``p != 2``;
    ``spare``: a buffer of ``w``'s shape to work in."""
    cw = torch.empty_like(w) if spare is None else spare
    if p == 2:
        cw.copy_(c)
    else:
        torch.mul(q, s[:, None], out=cw).sub_(w).abs_().clamp_min_(1e-12 * s[:, None])
        (cw if p == 3 else cw.pow_(p - 2)).mul_(c)
    cw.mul_(q)  # the reweighted importances times the levels
    num, den = torch.linalg.vecdot(cw, w), torch.linalg.vecdot(cw, q)
    return torch.where(den > 0, num / den.clamp_min(1e-30), s).clamp_min(FP16_TINY)


@dataclass(frozen=True)
class AffineSearch:
    """Scale and integer zero point per row for the asymmetric grid (``w = s * (u - z)``, ``u`` in
    ``[0, 2^k - 1]``): a scan of ranges shrunk about the kept weights' midpoint (each with the
    zero point nearest its low end), a finer scan around the best basins, then steps that
    re-round the codes and solve the (reweighted) least-squares scale exactly, each also trying
    the zero point one up and one down, which moves the range off centre. ``coarse=0`` is the
    min-max baseline. Like :class:`Search`, every candidate is judged at its stored values
    (fp16 scale, zero point in steps of ``2^-zero_shift``) and kept only if it lowers the loss.
    ``zero_shift > 0`` then frees the zero point from the integers: rounds that try every
    fractional shift of up to half a code (in ``fraction_steps`` steps), then refit the scale to
    the shifted levels, so the result is never worse than the integer one.
    """

    objective: Objective = field(default_factory=lambda: Objective(p=3.0))
    coarse: int = 20
    min_shrink: float = 0.3
    basins: int = 2
    fine: int = 6
    refine: int = 4
    zero_shift: int = 0
    fraction_rounds: int = 2
    fraction_steps: int = 16

    def solve(self, w: torch.Tensor, c: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, zero points)``, each ``(rows,)`` (zero points as floats in steps of ``2^-zero_shift``)."""
        s0, z0 = min_max(w, c > 0, grid)
        unit = 2.0**self.zero_shift
        best = _Best(
            lambda s, z: self.objective.affine_loss(w, c, s, z, grid),
            lambda s, z: (to_fp16_grid(s), (z * unit).round_().clamp_(0, grid.top * unit).div_(unit)),
            s0,
            z0,
        )
        if self.coarse == 0:
            return best.params
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        lo = torch.where(c > 0, w, zero).amin(dim=1).clamp_max(0)
        mid = lo + s0 * grid.top / 2

        def shrunk(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = to_fp16_grid(s0 * t)
            return s, zero_point(mid - s * grid.top / 2, s, grid)

        _scan(best, shrunk, s0, self.coarse, self.min_shrink, self.basins, self.fine)
        for _ in range(self.refine):
            s, z = best.params
            for dz in (-1, 1):
                best.consider(s, z + dz)
            s, z = best.params
            q = grid.affine_codes(w, s[:, None], z[:, None]) - z[:, None]
            best.consider(_fit_scale(w, c, s, q, self.objective.p), z)
        if self.zero_shift:
            steps = min(self.fraction_steps, 1 << self.zero_shift)
            shifts = [(i - steps / 2) / steps for i in range(steps + 1) if i != steps // 2]
            for _ in range(self.fraction_rounds):
                s, z = best.params
                for d in shifts:
                    best.consider(s, z + d)
                s, z = best.params
                q = grid.affine_codes(w, s[:, None], z[:, None]) - z[:, None]
                best.consider(_fit_scale(w, c, s, q, self.objective.p), z)
        return best.params


SOLVERS: dict[str, type[RangeSolver]] = {
    "rtn": MaxAbs,
    "mse": GridSearch,
    "paper": PaperAdam,
    "search": Search,
}


def make_solver(name: str, p: float | None = None, **options: object) -> RangeSolver:
    """A solver by name, with its default objective unless ``p`` is given."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None
    if p is not None:
        options["objective"] = Objective(p=p)
    return cls(**options)
