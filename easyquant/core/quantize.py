"""Quantize one weight matrix: validate, isolate outliers, solve ranges, pack."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from ..errors import EasyQuantError
from .grid import FP16_MAX, Grid, ends, max_abs_scale, to_fp16_grid, zero_shift
from .groups import block_elements, from_groups, to_groups
from .objective import Objective
from .outliers import Scope, sigma_mask
from .packing import pack
from .qweight import QuantizedWeight, csr_from_mask
from .savings import savings_mask
from .shards import stack_rows
from .sinkhorn import column_scales
from .solvers import SOLVERS, AffineSearch, RangeSolver, make_solver

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Above this share of outliers the sparse part is no longer sparse: it costs more than it saves.
WARN_OUTLIER_FRACTION = 0.05
AFFINE_SOLVERS = ("search", "rtn")
OUTLIER_RULES = ("sigma", "savings")
# A group offers at most this many weights to the savings rule (each one more solve of the matrix).
MAX_SAVINGS_DEPTH = 8
SQUARED = Objective(p=2)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a weight matrix.

    ``group_size=None`` is per output channel. ``n_sigma=None`` keeps no outliers.
    ``p=None`` takes the solver's default objective (2 for ``paper``, 2.4 for ``mse``,
    3 for ``search``). ``max_outlier_fraction`` refuses an ``n_sigma`` that would turn a
    large share of the weights into fp16 outliers. ``lr`` and ``steps`` set the ``paper``
    solver's Adam (default: the paper's BLOOM setting, 1e-3 and 100; its LLaMA setting is 1e-4
    and 500). ``orient=False`` gives every row a positive scale, as the paper does, instead of
    putting each row's largest weight on the grid's longer side. ``asymmetric=True`` adds an
    integer zero point per row or group (the unsigned grid, ``w = scale * (u - zero)``); its
    ranges come from :class:`~easyquant.core.solvers.AffineSearch` (``solver="search"``) or min-max
    (``solver="rtn"``); ``fractional_zero=True`` lets the zero point take fractions of a code
    (:class:`~easyquant.core.solvers.AffineSearch`, still one byte). ``col_scale`` adds a scale
    ``t_j`` per input column (dual-axis scaling, :mod:`easyquant.core.sinkhorn`), applied to the
    activations at inference; the ranges are then solved on the column-normalised weight
    ``w / t`` with column ``j`` weighted by
    ``t_j^(col_power * p)``: 0 is the plain normalised error (SINQ's), 1 the weight's own
    error, and the default -1 leans further towards columns of small spread, which tend to meet
    the largest activations (-1 had the lowest KL on SmolLM2 and tied on MiniLM: RESULTS.md).
    ``outlier_rule="savings"`` keeps as many outliers as the sigma rule finds (per tensor or per
    row, as ``outlier_scope`` says), but the ones whose removal lowers the loss most once the
    ranges are solved again (:mod:`easyquant.core.savings`); it costs a few more solves per matrix.

    The defaults (groups of 64, outliers past 4 sigma, column scales, 4.32 bits per weight on a
    576-column model) are the setting with the lowest KL divergence at about 4.4 bits per weight
    on every real model measured (RESULTS.md, "Choosing the default"); ``group_size=None,
    n_sigma=3, col_scale=False`` is the paper's per-channel shape.
    """

    bits: int = 4
    group_size: int | None = 64
    n_sigma: float | None = 4.0
    outlier_scope: Scope = "tensor"
    outlier_rule: str = "sigma"
    solver: str = "search"
    p: float | None = None
    max_outlier_fraction: float = 0.1
    lr: float | None = None
    steps: int | None = None
    orient: bool = True
    asymmetric: bool = False
    fractional_zero: bool = False
    col_scale: bool = True
    col_power: float = -1.0

    def __post_init__(self) -> None:
        Grid(self.bits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise EasyQuantError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if self.n_sigma is not None and not (math.isfinite(self.n_sigma) and self.n_sigma > 0):
            raise EasyQuantError(f"n_sigma must be a positive number or None, got {self.n_sigma!r}")
        if self.outlier_scope not in ("tensor", "row"):
            raise EasyQuantError(f"outlier_scope must be 'tensor' or 'row', got {self.outlier_scope!r}")
        if self.outlier_rule not in OUTLIER_RULES:
            raise EasyQuantError(f"outlier_rule must be one of {', '.join(OUTLIER_RULES)}, got {self.outlier_rule!r}")
        if self.solver not in SOLVERS:
            raise EasyQuantError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if (self.lr is not None or self.steps is not None) and self.solver != "paper":
            raise EasyQuantError(f"lr and steps set the paper solver's Adam; solver {self.solver!r} takes neither")
        if self.lr is not None and not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise EasyQuantError(f"lr must be a positive number, got {self.lr!r}")
        if self.steps is not None and (type(self.steps) is not int or self.steps < 1):
            raise EasyQuantError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("orient", "asymmetric", "fractional_zero", "col_scale"):
            if not isinstance(getattr(self, key), bool):
                raise EasyQuantError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not (isinstance(self.col_power, int | float) and math.isfinite(self.col_power)):
            raise EasyQuantError(f"col_power must be a finite number, got {self.col_power!r}")
        if self.asymmetric and self.solver not in AFFINE_SOLVERS:
            raise EasyQuantError(
                f"asymmetric ranges are solved by {' or '.join(AFFINE_SOLVERS)}, not solver {self.solver!r}"
            )
        if self.fractional_zero and not (self.asymmetric and self.solver == "search"):
            raise EasyQuantError("fractional_zero needs asymmetric=true and solver 'search' (it refines that zero)")

    @property
    def zero_shift(self) -> int:
        return zero_shift(self.bits, self.fractional_zero)

    def make_affine_solver(self) -> AffineSearch:
        objective = {"objective": Objective(p=self.p)} if self.p is not None else {}
        return AffineSearch(coarse=0) if self.solver == "rtn" else AffineSearch(**objective, zero_shift=self.zero_shift)

    def make_solver(self) -> RangeSolver:
        options = {k: v for k, v in (("lr", self.lr), ("steps", self.steps)) if v is not None}
        return make_solver(self.solver, self.p, **options)

    @property
    def objective_p(self) -> float:
        """The norm of the error the range solver minimises."""
        return (self.make_affine_solver() if self.asymmetric else self.make_solver()).objective.p

    def to_dict(self) -> dict:
        return asdict(self)


def validate_weight(w: torch.Tensor, name: str) -> None:
    """Raise :class:`EasyQuantError` naming ``name`` for anything that is not a finite 2-D float matrix."""
    if not isinstance(w, torch.Tensor):
        raise EasyQuantError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise EasyQuantError(
            f"{name}: dtype {w.dtype} is not a floating-point weight; easyquant quantizes fp16, bf16, fp32 or fp64"
        )
    if w.dim() != 2:
        raise EasyQuantError(f"{name}: expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise EasyQuantError(f"{name}: weight is empty (shape {tuple(w.shape)})")
    lo, hi = (v.item() for v in w.aminmax())  # one pass; NaN propagates into both
    if -FP16_MAX <= lo and hi <= FP16_MAX:
        return
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise EasyQuantError(f"{name}: weight holds {bad} NaN or Inf values; refusing to quantize it")
    raise EasyQuantError(
        f"{name}: weights exceed the fp16 range (|w| > {FP16_MAX:g}); its scales and outliers cannot be stored in fp16"
    )


def outlier_mask(w: torch.Tensor, config: QuantConfig, name: str) -> torch.Tensor:
    if config.n_sigma is None:
        return torch.zeros_like(w, dtype=torch.bool)
    mask = sigma_mask(w, config.n_sigma, config.outlier_scope)
    frac = mask.count_nonzero().item() / mask.numel()
    if frac > config.max_outlier_fraction:
        raise EasyQuantError(
            f"{name}: n_sigma={config.n_sigma:g} ({config.outlier_scope}) makes {frac:.1%} of the weights outliers, "
            f"over the limit of {config.max_outlier_fraction:.0%}; use a larger n_sigma"
        )
    if frac > WARN_OUTLIER_FRACTION:
        warnings.warn(
            f"{name}: {frac:.2%} of the weights are outliers (n_sigma={config.n_sigma:g}); "
            "the sparse part will be costly",
            stacklevel=3,
        )
    return mask


class Shared:
    """What scoring one weight at several settings (:func:`rtn_errors`) can share: the sigma
    rule's outlier mask depends only on ``n_sigma`` and its scope, the column scales only on that
    mask and the group size, neither on the bit width; each is computed once, the very tensors
    :func:`quantize_weight` computes."""

    def __init__(self) -> None:
        self._masks: dict[tuple, torch.Tensor] = {}
        self._scales: dict[tuple, torch.Tensor] = {}

    def mask(self, x: torch.Tensor, config: QuantConfig, name: str) -> torch.Tensor:
        key = (config.n_sigma, config.outlier_scope, config.max_outlier_fraction)
        if key not in self._masks:
            self._masks[key] = outlier_mask(x, config, name)
        return self._masks[key]

    def col_scales(self, x: torch.Tensor, mask: torch.Tensor, config: QuantConfig, gs: int) -> torch.Tensor:
        key = (config.n_sigma, config.outlier_scope, gs)
        if key not in self._scales:
            self._scales[key] = column_scales(x, ~mask, gs)
        return self._scales[key]


def quantize_weight(
    w: torch.Tensor,
    config: QuantConfig | None = None,
    col_weight: torch.Tensor | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """EasyQuant one ``(out_features, in_features)`` weight.

    ``col_weight`` (``(in_features,)``, non-negative) weighs each input column in the range
    objective, for example by the squared norm weights that scale the layer's inputs.
    Computation runs in fp32 on ``w``'s device; the result is bit-identical for the same
    input and settings.
    """
    config = config or QuantConfig()
    validate_weight(w, name)
    rows, cols = w.shape
    gs = min(config.group_size or cols, cols)
    grid = Grid(config.bits)
    x = w.float()
    mask = outlier_mask(x, config, name)

    importance = torch.ones(cols, device=x.device)
    if col_weight is not None:
        if col_weight.shape != (cols,) or not bool(torch.isfinite(col_weight).all()) or bool((col_weight < 0).any()):
            raise EasyQuantError(
                f"{name}: col_weight must be {cols} finite non-negative values, got shape {tuple(col_weight.shape)}"
            )
        importance = col_weight.to(importance)
    t = None
    if config.col_scale:  # solve on the column-normalised x / t, column j weighted by t_j^(col_power * p)
        t = column_scales(x, ~mask, gs)
        importance = importance * t.pow(config.col_power * config.objective_p)
    step = block_elements(w.device)
    if config.outlier_rule == "savings" and bool(mask.any()):
        mask = _by_savings(x if t is None else x / t, importance, mask, config, grid, gs, step // gs)
    # Row blocks of about ``step`` weights, each quantized whole and then stacked: the solver's
    # many passes over a block stay in cache, and no temporary is the size of the matrix.
    block = max(1, step // cols)
    parts = [
        _quantize_rows(x[r : r + block], mask[r : r + block], importance, t, config, grid, gs, w.dtype)
        for r in range(0, rows, block)
    ]
    return parts[0] if len(parts) == 1 else stack_rows(parts)


def rtn_errors(w: torch.Tensor, configs: list[QuantConfig], name: str = "weight") -> list[tuple[float, int]]:
    """For each of ``configs`` (settings of the one weight ``w``): the relative squared error
    ``||W - Q[W]||^2 / ||W||^2`` at its bits, groups, outliers and column scales, but rounded to
    the nearest code at max-abs ranges instead of solved, and its outlier count; nothing packed.
    The bit budget scores its menu with it: solving every setting costs about twelve times the
    default, while the plan RTN's errors give is nearly the solved errors' (RESULTS.md, "Bits per
    layer"). Symmetric settings that differ only in bits share one pass for their rows' ends,
    and each then costs one buffered loss evaluation (the search makes about twenty)."""
    validate_weight(w, name)
    rows, cols = w.shape
    x = w.float()
    shared = Shared()  # one mask per outlier rule, one Sinkhorn per rule and group size
    layouts: dict[tuple, list[int]] = {}  # settings alike but for their bits
    for i, c in enumerate(configs):
        gs = min(c.group_size or cols, cols)
        layouts.setdefault((c.n_sigma, c.outlier_scope, c.max_outlier_fraction, gs, c.col_scale, c.asymmetric,
                            c.orient), []).append(i)  # fmt: skip
    block = max(1, block_elements(w.device) // cols)
    total = max(x.square().sum().item(), 1e-30)
    out: dict[int, tuple[float, int]] = {}
    for (*_, gs, col_scale, asymmetric, orient), alike in layouts.items():
        first = configs[alike[0]]
        mask = shared.mask(x, first, name)
        t = shared.col_scales(x, mask, first, gs) if col_scale else None
        # The error in w's own units: a column-normalised weight's error times t_j^2.
        importance = torch.ones(cols, device=x.device) if t is None else t.square()
        err = [0.0] * len(alike)
        for r in range(0, rows, block):
            wg = to_groups(x[r : r + block] if t is None else x[r : r + block] / t, gs)
            cg = to_groups(torch.where(mask[r : r + block], 0.0, importance), gs)
            if asymmetric:
                for k, i in enumerate(alike):
                    rtn, grid = replace(configs[i], solver="rtn", fractional_zero=False), Grid(configs[i].bits)
                    err[k] += _loss(wg, cg, _solve(wg, cg, rtn, grid, len(wg)), rtn, grid, p=2).sum().item()
                continue
            sign, longer, shorter = ends(wg, cg > 0, orient)
            work = (torch.empty_like(wg), torch.empty_like(wg))
            for k, i in enumerate(alike):
                grid = Grid(configs[i].bits)
                s = to_fp16_grid(max_abs_scale(longer, shorter, grid)) * sign
                err[k] += SQUARED.loss(wg, cg, s, grid, work).sum().item()
        count = int(mask.count_nonzero())
        out |= {i: (e / total, count) for i, e in zip(alike, err, strict=True)}
    return [out[i] for i in range(len(configs))]


def _quantize_rows(
    x: torch.Tensor,
    mask: torch.Tensor,
    importance: torch.Tensor,
    t: torch.Tensor | None,
    config: QuantConfig,
    grid: Grid,
    gs: int,
    dtype: torch.dtype,
) -> QuantizedWeight:
    """Rows ``x`` (fp32) of a ``dtype`` weight with their outliers ``mask``, the columns'
    importances and scales ``t``."""
    rows, cols = x.shape
    wg = to_groups(x if t is None else x / t, gs)
    cg = to_groups(torch.where(mask, 0.0, importance), gs)
    codes, scales, zeros = _solve(wg, cg, config, grid, len(wg))
    codes, scales = from_groups(codes, rows, cols), scales.reshape(rows, -1)
    zeros = None if zeros is None else zeros.reshape(rows, -1)
    # Outliers hold the code nearest 0 (qmin's distance from 0, or the zero point rounded), so the
    # dense part adds nothing there, or under a fractional zero point the little that an
    # outlier's stored value (the weight less that little) makes up.
    values = x
    if zeros is None:
        zero_code = -grid.qmin
    else:
        point = (zeros.float() * 2.0**-config.zero_shift).repeat_interleave(gs, dim=1)[:, :cols]
        zero_code = point.round()
        if config.zero_shift:
            step = scales.float().repeat_interleave(gs, dim=1)[:, :cols]
            values = values - (zero_code - point) * step * (1 if t is None else t.half().float())
    codes = torch.where(mask, zero_code, codes)
    rowptr, col_idx, values = csr_from_mask(mask, values)
    return QuantizedWeight(
        packed=pack(codes.to(torch.uint8), config.bits),
        scales=scales,
        outlier_rowptr=rowptr,
        outlier_cols=col_idx,
        outlier_values=values,
        bits=config.bits,
        group_size=gs,
        shape=(rows, cols),
        dtype=dtype,
        zeros=zeros,
        col_scales=None if t is None else t.half(),
        zero_shift=config.zero_shift,
    )


Solved = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # codes, scales, zero points (or None)


def _by_savings(
    x: torch.Tensor,
    importance: torch.Tensor,
    mask: torch.Tensor,
    config: QuantConfig,
    grid: Grid,
    gs: int,
    step: int,
) -> torch.Tensor:
    """The sigma rule's count of outliers (``mask``) spent where it saves most
    (:mod:`easyquant.core.savings`), kept only where that lowers the objective: the choice is
    greedy on estimates, so it is checked against the sigma rule's. ``x``: the weight as solved
    (column-normalised where there are column scales)."""
    wg = to_groups(x, gs)

    def loss(wg: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
        return _loss(wg, cg, _solve(wg, cg, config, grid, step), config, grid)

    budget = mask.sum() if config.outlier_scope == "tensor" else mask.sum(dim=1)
    depth = min(int(to_groups(mask, gs, fill=False).sum(dim=1).max()) + 1, MAX_SAVINGS_DEPTH)
    alt = savings_mask(x, importance.expand_as(x), budget, gs, depth, loss)
    cg, alt_cg = (to_groups((~m).float() * importance, gs) for m in (mask, alt))
    return alt if loss(wg, alt_cg).sum() < loss(wg, cg).sum() else mask


def _solve(wg: torch.Tensor, cg: torch.Tensor, config: QuantConfig, grid: Grid, step: int) -> Solved:
    """Codes, scales and (asymmetric) zero points of grouped rows."""
    return (_solve_affine if config.asymmetric else _solve_symmetric)(wg, cg, config, grid, step)


def _loss(
    wg: torch.Tensor, cg: torch.Tensor, solved: Solved, config: QuantConfig, grid: Grid, p: float | None = None
) -> torch.Tensor:
    """Each group's loss at its solved ranges, as stored (fp16 scales), in the objective's norm or ``p``."""
    codes, scales, zeros = solved
    levels = codes + grid.qmin if zeros is None else codes - zeros.float()[:, None] * 2.0**-config.zero_shift
    return Objective(p=p or config.objective_p).weighted(levels * scales.float()[:, None] - wg, cg)


def _chunks(n: int, step: int) -> range:
    return range(0, n, max(1, step))


def _solve_symmetric(
    wg: torch.Tensor, cg: torch.Tensor, config: QuantConfig, grid: Grid, step: int
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Unsigned codes ``q - qmin`` and signed fp16 scales of grouped rows."""
    solver = config.make_solver()
    s = torch.cat(
        [solver.solve_signed(wg[i : i + step], cg[i : i + step], grid, config.orient) for i in _chunks(len(wg), step)]
    )
    return grid.codes(wg, s[:, None]) - grid.qmin, s.to(torch.float16), None


def _solve_affine(
    wg: torch.Tensor, cg: torch.Tensor, config: QuantConfig, grid: Grid, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned codes, fp16 scales and uint8 zero points of grouped rows on the asymmetric grid."""
    solver = config.make_affine_solver()
    parts = [solver.solve(wg[i : i + step], cg[i : i + step], grid) for i in _chunks(wg.shape[0], step)]
    s, z = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    zeros = (z * 2**config.zero_shift).round().to(torch.uint8)  # exact: the solver's steps are 2^-zero_shift
    return grid.affine_codes(wg, s[:, None], z[:, None]), s.to(torch.float16), zeros
