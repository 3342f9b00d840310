"""Column scales folded into the model, so that the stored weights need no activation scaling.

A column scale ``t`` (:mod:`easyquant.core.sinkhorn`) stores ``W = Q[W / t] * t``, and a runtime
must scale every input by ``t``. Where the input is made by an operation that is linear per
channel, the scale can move into it instead, and the stored weight is a plain one that any
kernel serves (llama.cpp, Marlin, the exports):

- a norm whose output is ``normed(x) * g`` (+ ``b``): its ``g`` and ``b`` times ``t``, with one
  ``t`` for every linear that reads that norm (q/k/v, gate/up), solved over their rows stacked;
- a linear whose output rows are the input columns of the next one (v_proj -> o_proj through
  attention, which mixes tokens but not channels; up_proj -> down_proj through the gated
  product): those rows and their bias times the next one's ``t``. Grouped-query heads share a
  value head, so ``t`` is tied over the heads that read it.

A :class:`Fold` names such a place; :func:`solve_folds` computes every fold's scales and the
tensors they change; :func:`quantize_folded` quantizes one weight with its fold, weighing its
columns as :func:`~easyquant.core.quantize.quantize_weight` weighs its own column scales.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from .grid import to_fp16_grid
from .outliers import sigma_mask
from .quantize import QuantConfig, quantize_weight, validate_weight
from .qweight import QuantizedWeight
from .sinkhorn import column_scales

# Which folds a run makes: none, the rows of the linear before (v_proj -> o_proj, up_proj ->
# down_proj: no shared scale, lower KL than column scales at run time on SmolLM2), or also the
# norms (q/k/v and gate/up then share one scale: every weight plain, at a KL cost).
FOLD_MODES = ("none", "rows", "all")


@dataclass(frozen=True)
class Fold:
    """The linears ``readers`` read one input, made by module ``into``: a norm (``rows=False``)
    or a linear whose output rows are that input (``rows=True``; its output holds ``heads``
    value heads of ``head_dim`` channels, each read by ``repeat`` query heads)."""

    into: str
    readers: tuple[str, ...]
    rows: bool = False
    bias: bool = False  # whether ``into`` has a bias (scaled with it)
    repeat: int = 1
    head_dim: int = 1


def chosen(folds: list[Fold], mode: str) -> list[Fold]:
    """The folds a run in ``mode`` (one of :data:`FOLD_MODES`) makes."""
    return [f for f in folds if mode == "all" or (mode == "rows" and f.rows)]


# A module's fold: the multiplier of its output rows and the divisor of its input columns (either may be None).
Scales = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass
class Folding:
    """Every fold of a model, solved: each quantized module's scales, and the new values of the
    tensors that absorb them (norm weights and biases, bias of a scaled linear), by name."""

    scales: dict[str, Scales] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def of(self, module: str) -> Scales:
        return self.scales.get(module, (None, None))


def _balanced(t: torch.Tensor) -> torch.Tensor:
    """``t`` over its geometric mean, on the fp16 grid: the model's activations and stored
    weights keep their magnitude on average (only the ratios between columns matter)."""
    return to_fp16_grid(t / t.log().mean().exp())


def _keep(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """The weights the range solver will see (outliers aside), as :func:`column_scales` wants them."""
    if config.n_sigma is None:
        return torch.ones_like(w, dtype=torch.bool)
    return ~sigma_mask(w, config.n_sigma, config.outlier_scope)


def shared_scales(weights: list[torch.Tensor], configs: list[QuantConfig]) -> torch.Tensor:
    """One column scale per input for matrices that read the same input: the geometric mean of
    each one's own scales (one Sinkhorn over the rows of all of them stacked had a higher KL on
    SmolLM2: RESULTS.md, "Folding column scales")."""
    logs = [
        column_scales(w.float(), _keep(w, c), c.group_size or w.shape[1]).float().log()
        for w, c in zip(weights, configs, strict=True)
    ]
    return _balanced(torch.stack(logs).mean(0).exp())


def tied_scales(w: torch.Tensor, config: QuantConfig, repeat: int, head_dim: int) -> torch.Tensor:
    """Column scales of ``w`` ``(rows, heads * head_dim)`` tied over the ``repeat`` query heads
    that share a value head: ``(heads / repeat * head_dim,)``, one per value channel. The heads
    of a group are stacked as extra rows, so one scale evens out all of their columns."""
    rows, cols = w.shape
    kv = cols // (repeat * head_dim)

    def stacked(m: torch.Tensor) -> torch.Tensor:  # column h * head_dim + d of head h = g * repeat + r
        return m.reshape(rows, kv, repeat, head_dim).permute(2, 0, 1, 3).reshape(repeat * rows, kv * head_dim)

    group = min(config.group_size or cols, kv * head_dim)
    return _balanced(column_scales(stacked(w.float()), stacked(_keep(w, config)), group))


def expand(u: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """Value-channel scales ``(kv * head_dim,)`` as the reader's column scales ``(kv * repeat * head_dim,)``."""
    return u.reshape(-1, 1, head_dim).expand(-1, repeat, head_dim).reshape(-1)


def solve_folds(
    folds: list[Fold],
    load: Callable[[str], torch.Tensor],
    configs: Mapping[str, QuantConfig],
    on_fold: Callable[[], None] | None = None,
) -> Folding:
    """Scales for every fold (``load(name)``: a tensor by name, ``{module}.weight``; ``configs``:
    each reader's settings). Row folds first: a norm's readers (v_proj, up_proj) may be
    scaled by the next layer's fold, and their shared scale is solved on the scaled weights."""
    out = Folding()

    def weight(module: str) -> torch.Tensor:
        w = load(f"{module}.weight")
        validate_weight(w, f"{module}.weight")  # before any scale is solved on it
        return w

    for fold in sorted(folds, key=lambda f: not f.rows):
        if fold.rows:
            (reader,) = fold.readers
            u = tied_scales(weight(reader), configs[reader], fold.repeat, fold.head_dim)
            out.scales[reader] = (out.of(reader)[0], expand(u, fold.repeat, fold.head_dim))
            out.scales[fold.into] = (u, out.of(fold.into)[1])
        else:
            weights = []
            for r in fold.readers:
                rows = out.of(r)[0]
                w = weight(r)
                weights.append(w if rows is None else w.float() * rows[:, None])
            u = shared_scales(weights, [configs[r] for r in fold.readers])
            for r in fold.readers:
                out.scales[r] = (out.of(r)[0], u)
            out.dense[f"{fold.into}.weight"] = _scaled(load(f"{fold.into}.weight"), u)
        if fold.bias:
            out.dense[f"{fold.into}.bias"] = _scaled(load(f"{fold.into}.bias"), u)
        if on_fold:
            on_fold()
    return out


def _scaled(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (t.float() * u.float()).to(t.dtype)


def folded_weight(w: torch.Tensor, scales: Scales) -> torch.Tensor:
    """``diag(rows) w diag(1 / cols)`` in fp32: the weight as the folded model holds it."""
    rows, cols = scales
    x = w.float()
    x = x if rows is None else x * rows.float()[:, None]
    return x if cols is None else x / cols.float()


def unfolded_weight(w: torch.Tensor, scales: Scales) -> torch.Tensor:
    """The inverse of :func:`folded_weight`: a folded weight as the unchanged model would hold it."""
    rows, cols = scales
    x = w.float()
    x = x if rows is None else x / rows.float()[:, None]
    return x if cols is None else x * cols.float()


def quantize_folded(w: torch.Tensor, config: QuantConfig, scales: Scales, name: str = "weight") -> QuantizedWeight:
    """Quantize ``w`` as its fold stores it: :func:`folded_weight`, no column scales of its own,
    column ``j`` weighted by ``cols_j^(col_power * p)`` as ``quantize_weight`` weighs its own
    column scales (a fold of the rows alone keeps them). Without a fold, ``quantize_weight``."""
    rows, cols = scales
    if rows is None and cols is None:
        return quantize_weight(w, config, name=name)
    validate_weight(w, name)  # as it is, not as folded
    weight = None if cols is None else cols.float().pow(config.col_power * config.objective_p)
    own = config.col_scale and cols is None  # a fold of the rows alone leaves the columns' own scales
    qw = quantize_weight(folded_weight(w, scales), replace(config, col_scale=own), weight, name)
    return replace(qw, dtype=w.dtype)
