"""``easyquant compare``: every method on the same model, windows, tokenizer and text, in one table.

Each method quantizes a fresh copy of the model in memory (each quantized weight replaced by
what its checkpoint would dequantize to, which the tests show equals loading the checkpoint),
then is measured against the full-precision model on the same evaluation windows. The
block linears and, in mixture-of-experts models, every expert matrix are quantized by the
methods that work weight by weight; GPTQ, which needs each layer's calibration inputs, does
the linears only; each row says what share of the model's weights it quantized. Size is the
checkpoint's tensor bytes: quantized linears at their bits per weight (every overhead counted),
everything else as the model stores it. Generation speed is measured where the method's
packed format has a runtime here: for methods that write the easyquant format, the copy's
linears are swapped for :class:`EasyQuantLinear` modules holding the packed weights (what
``from_pretrained`` gives) and timed against the original model on the same prompt.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.folds import find_folds
from ..checkpoint.pipeline import MIN_QUANTIZED_SHARE
from ..checkpoint.targets import block_linears, expert_matrices
from ..core.allocate import Choice, choose, menu, score
from ..core.fold import FOLD_MODES, Folding, chosen, quantize_folded, solve_folds, unfolded_weight
from ..core.quantize import QuantConfig, quantize_weight
from ..core.qweight import QuantizedWeight
from ..errors import EasyQuantError
from ..progress import progress_bar
from ..runtime.nn import swap_in_quantized
from .evaluate import Reference, evaluate, generation_speed
from .gptq import gptq_model
from .peers import hqq_quantize, sinq_quantize
from .plots import save_plot

Linears = list[tuple[str, nn.Linear]]


@dataclass
class Quantized:
    """What a method did to the linears: bits per weight and outlier fraction over them (all
    overheads counted), and the packed weights where it writes the easyquant format."""

    bits_per_weight: float
    outlier_fraction: float
    weights: int  # how many weights it quantized
    experts: bool = False  # whether those include the experts
    packed: dict[str, QuantizedWeight] | None = None
    reused_seconds: float = 0.0  # time of shared work done for an earlier row, counted in this row's time too
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # folded tensors the packed weights expect


# A method quantizes the given linears of a model in place (calibration windows for the data-dependent one).
Method = Callable[[nn.Module, Linears, int, torch.Tensor], Quantized]
PerLayer = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, float, int, QuantizedWeight | None]]


def _per_layer(fn: PerLayer) -> Method:
    """A method that quantizes each weight on its own, experts included:
    ``fn(name, w, bits) -> (w_hat, bpw, outliers, packed)``. Packed weights (for the speed
    measure) only for models without experts."""

    def run(model: nn.Module, linears: Linears, bits: int, calib: torch.Tensor) -> Quantized:
        total = bits_sum = outliers = 0
        packed = {}
        for name, w in [(name, lin.weight.data) for name, lin in linears] + expert_matrices(model):
            w_hat, bpw, n_out, packed[name] = fn(name, w.contiguous(), bits)
            w.copy_(w_hat)
            bits_sum += bpw * w.numel()
            outliers += n_out
            total += w.numel()
        experts = len(packed) > len(linears)
        usable = None not in packed.values() and not experts
        return Quantized(bits_sum / total, outliers / total, total, experts, packed if usable else None)

    return run


def easyquant_method(fold: str = "rows", **kw: object) -> Method:
    """easyquant with settings ``kw``, column scales folded into the model as ``easyquant
    quantize --fold`` folds them (:mod:`easyquant.core.fold`). The model keeps its norms:
    each folded linear holds its weight unfolded, which computes the same."""

    def run(model: nn.Module, linears: Linears, bits: int, calib: torch.Tensor) -> Quantized:
        config = QuantConfig(bits=bits, **kw)
        folding = Folding()
        if config.col_scale:
            names = {name for name, _ in linears}
            folds = chosen(find_folds(model, names.__contains__), fold)
            folding = solve_folds(folds, lambda key: model.get_parameter(key).data, dict.fromkeys(names, config))

        def one(name: str, w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, int, QuantizedWeight]:
            qw = quantize_folded(w, config, folding.of(name), name)
            w_hat = unfolded_weight(qw.dequantize(), folding.of(name)).to(w.dtype)
            return w_hat, qw.bits_per_weight, qw.outlier_count, qw

        result = _per_layer(one)(model, linears, bits, calib)
        result.dense = folding.dense
        return result

    return run


# What target_method has scored: (base setting, layer names) -> (score's table and count, seconds).
Scores = dict[tuple[QuantConfig, tuple[str, ...]], tuple[dict[str, list[Choice]], int, float]]


def target_method(target_bpw: float, scores: Scores | None = None, **kw: object) -> Method:
    """easyquant with a setting per layer (:func:`easyquant.core.allocate.choose`) within ``target_bpw``
    bits per weight over the linears, from a base of the row's bits and ``kw``. Rows that share
    ``scores`` (one compare run: its weights restored between rows) score each base only once:
    the 12 settings per layer are most of the time (each row's time still includes it)."""
    scores = {} if scores is None else scores

    def run(model: nn.Module, linears: Linears, bits: int, calib: torch.Tensor) -> Quantized:
        weights = [(name, lin.weight.data) for name, lin in linears]
        base = QuantConfig(bits=bits, **kw)
        key = (base, tuple(name for name, _ in weights))
        options, reused = menu(base), key in scores
        if not reused:
            t0 = time.perf_counter()
            scores[key] = (*score([(n, lambda w=w: w) for n, w in weights], options, False), time.perf_counter() - t0)
        table, total, seconds = scores[key]
        configs = choose(table, total, options, target_bpw)
        packed = {name: quantize_weight(w, configs[name], name=name) for name, w in weights}
        for name, w in weights:
            w.copy_(packed[name].dequantize())
        bits_sum = sum(q.bits_per_weight * q.shape[0] * q.shape[1] for q in packed.values())
        outliers = sum(q.outlier_count for q in packed.values()) / total
        return Quantized(bits_sum / total, outliers, total, False, packed, seconds if reused else 0.0)

    return run


def hqq_method(group_size: int) -> Method:
    return _per_layer(lambda name, w, bits: (*hqq_quantize(w, bits, group_size), 0, None))


def sinq_method(group_size: int) -> Method:
    return _per_layer(lambda name, w, bits: (*sinq_quantize(w, bits, group_size), 0, None))


def gptq_method(group_size: int | None) -> Method:
    def run(model: nn.Module, linears: Linears, bits: int, calib: torch.Tensor) -> Quantized:
        gptq_model(model, linears, calib, bits, group_size)
        # Same storage as RTN: codes, an fp16 scale per row or group (no outliers).
        n = sum(lin.weight.numel() for _, lin in linears)
        scales = sum(lin.out_features * -(-lin.in_features // (group_size or lin.in_features)) for _, lin in linears)
        return Quantized(bits + 16 * scales / n, 0.0, n)

    return run


# The paper's shape: one scale per output row, outliers past 3 sigma, no column scales.
PER_CHANNEL = {"group_size": None, "n_sigma": 3.0, "col_scale": False}
METHODS: dict[str, Method] = {
    "rtn": easyquant_method(**PER_CHANNEL | {"solver": "rtn", "n_sigma": None}),
    "rtn-mse": easyquant_method(**PER_CHANNEL | {"solver": "mse", "n_sigma": None}),
    "hqq-g64": hqq_method(64),
    "hqq-g128": hqq_method(128),
    "sinq-g64": sinq_method(64),
    "sinq-g128": sinq_method(128),
    "paper": easyquant_method(**PER_CHANNEL | {"solver": "paper"}),
    "easyquant-channel": easyquant_method(**PER_CHANNEL),  # the paper's shape with easyquant's solver
    "easyquant": easyquant_method(),  # the defaults: groups of 64, 4 sigma, column scales
    "easyquant-g128": easyquant_method(group_size=128),
    "gptq": gptq_method(None),
    "gptq-g128": gptq_method(128),
}
DEFAULT_METHODS = (
    "rtn", "rtn-mse", "hqq-g64", "hqq-g128", "sinq-g64", "sinq-g128", "paper", "easyquant", "easyquant-g128", "gptq"
)  # fmt: skip


def _value(text: str) -> object:
    if text.lower() in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve(name: str, scores: Scores | None = None) -> Method:
    """A method by name, or ``easyquant:key=value/key=value`` with any :class:`QuantConfig`
    field (``easyquant:n_sigma=none/solver=search``), which is how the studies sweep settings;
    ``target_bpw=4.25`` among them chooses a setting per layer within that budget, from a base
    of the row's bits and the other fields (``scores``: shared by the target rows of one run)."""
    if name in METHODS:
        return METHODS[name]
    head, _, spec = name.partition(":")
    if head == "easyquant" and spec:
        settings = ["target_bpw", "fold", *(f.name for f in fields(QuantConfig))]
        try:
            pairs = [item.split("=", 1) for item in spec.split("/")]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("settings are key=value, separated by /")
            kw = {k: v if k == "fold" else _value(v) for k, v in pairs}  # fold=none is a mode, not None
            unknown = [k for k in kw if k not in settings]
            if unknown:
                raise ValueError(f"unknown setting {unknown[0]!r}; settings are {', '.join(settings)}")
            QuantConfig(**{k: v for k, v in kw.items() if k not in ("target_bpw", "fold")})  # fail here, naming it
            if kw.get("fold", "rows") not in FOLD_MODES:
                raise ValueError(f"fold is one of {', '.join(FOLD_MODES)}")
        except (ValueError, TypeError) as e:
            raise EasyQuantError(f"method {name!r}: {e}") from None
        target = kw.pop("target_bpw", None)
        if target is not None and kw.pop("fold", "none") != "none":
            raise EasyQuantError(f"method {name!r}: a bits budget is not folded (as easyquant quantize)")
        return easyquant_method(**kw) if target is None else target_method(float(target), scores, **kw)
    raise EasyQuantError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or easyquant:key=value/...")


@dataclass(frozen=True)
class Row:
    method: str
    bits: int
    bits_per_weight: float
    outlier_fraction: float
    rel_error: float  # ||W - Q[W]|| / ||W|| over every weight the method quantized
    quantized_share: float  # of the model's weights
    perplexity: float
    kl_mean: float
    kl_p99: float
    top1: float
    seconds: float
    size_mib: float
    tokens_per_s: float | None  # greedy generation, batch 1, in gen_dtype; None where no packed runtime is timed


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint holds: the state dict, tied weights counted once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def compare(
    model: nn.Module,
    windows: torch.Tensor,
    calib: torch.Tensor,
    methods: list[str],
    bits: list[int],
    on_row: Callable[[Row], None] | None = None,
    gen_tokens: int = 32,
    gen_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Row, list[Row]]:
    """The full-precision row and one row per (method, bits). ``gen_tokens``: how many tokens
    each timed model generates from the first 16 of the first window (0: no timing, and each
    method quantizes ``model`` itself, restored after its row, instead of a copy), with
    its floating-point tensors in ``gen_dtype`` (bf16 by default: on a CPU, what runs 4-bit
    weights through torch's int4 kernel; the reference is timed in the same dtype)."""
    scores: Scores = {}
    runs = {name: resolve(name, scores) for name in methods}
    model.eval()
    model_weights = sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point)

    def quantizable(m: nn.Module) -> list[torch.Tensor]:
        return [lin.weight.data for _, lin in block_linears(m)] + [w for _, w in expert_matrices(m)]

    originals = [w.float().clone() for w in quantizable(model)]
    all_bytes = _tensor_bytes(model)
    prompt = windows[:1, :16]

    def speed(m: nn.Module) -> float | None:  # casts m
        return generation_speed(m.to(gen_dtype), prompt, gen_tokens) if gen_tokens else None

    reference = Reference.of(model, windows)
    q = evaluate(model, windows, reference)
    fp = Row("full precision", 16, 16.0, 0.0, 0.0, 0.0, q.perplexity, q.kl_mean, q.kl_p99, q.top1, 0.0,
             _tensor_bytes(model) / 2**20, speed(copy.deepcopy(model)) if gen_tokens else None)  # fmt: skip
    rows = []
    for b in bits:
        for name in progress_bar(methods, desc=f"{b}-bit methods", unit="method", leave=False):
            # A copy when it will be timed (its linears get swapped for packed modules); else the model
            # itself, its weights restored afterwards: one model in memory, so 1.5B parameters fit in 24 GiB.
            m = copy.deepcopy(model) if gen_tokens else model
            linears = block_linears(m)
            t0 = time.perf_counter()
            result = runs[name](m, linears, b, calib)
            seconds = time.perf_counter() - t0 + result.reused_seconds
            # The weights it quantized (linears first, then experts), against the originals.
            pairs = list(zip(quantizable(m), originals, strict=True))[: None if result.experts else len(linears)]
            err = sum((w.float() - o).square().sum().item() for w, o in pairs)
            rel = (err / sum(o.square().sum().item() for _, o in pairs)) ** 0.5
            q = evaluate(m, windows, reference)
            stored = sum(w.numel() * w.element_size() for w, _ in pairs)
            size = (all_bytes - stored + result.bits_per_weight * result.weights / 8) / 2**20
            tokens_per_s = None
            if result.packed is not None and gen_tokens:
                for key, t in result.dense.items():  # the packed weights are the folded ones
                    m.get_parameter(key).data.copy_(t)
                swap_in_quantized(m, result.packed)
                tokens_per_s = speed(m)
            rows.append(Row(name, b, result.bits_per_weight, result.outlier_fraction, rel,
                            result.weights / model_weights, q.perplexity, q.kl_mean, q.kl_p99, q.top1, seconds, size,
                            tokens_per_s))  # fmt: skip
            if rows[-1].quantized_share < MIN_QUANTIZED_SHARE:
                warnings.warn(
                    f"{name}: quantized only {rows[-1].quantized_share:.0%} of the model's weights; the rest stay in "
                    "full precision in its row",
                    stacklevel=2,
                )
            if on_row:
                on_row(rows[-1])
            if m is model:
                for w, o in zip(quantizable(model), originals, strict=True):
                    w.copy_(o)
            del m
    return fp, rows


def _speed(r: Row, fp: Row) -> str:
    if r.tokens_per_s is None:
        return "-"
    return f"{r.tokens_per_s:.1f}" + ("" if r is fp else f" ({r.tokens_per_s / fp.tokens_per_s:.2f}x)")


def markdown(fp: Row, rows: list[Row]) -> str:
    lines = [
        "| method | bits | bits/weight | quantized | size (MiB) | outliers | weight rel. error | perplexity | KL mean "
        "| KL p99 | top-1 | quantize (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {fp.method} | 16 | - | - | {fp.size_mib:.1f} | - | - | {fp.perplexity:.3f} | 0 | 0 | 100% | - "
        f"| {_speed(fp, fp)} |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.bits} | {r.bits_per_weight:.3f} | {r.quantized_share:.0%} | {r.size_mib:.1f} "
            f"| {r.outlier_fraction:.3%} "
            f"| {r.rel_error:.4f} | {r.perplexity:.3f} | {r.kl_mean:.4f} | {r.kl_p99:.4f} | {r.top1:.2%} "
            f"| {r.seconds:.1f} | {_speed(r, fp)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    def draw(fig, ax) -> None:
        for name in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.bits_per_weight, r.kl_mean) for r in rows if r.method == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xlabel("bits per weight (all overheads)")
        ax.set_ylabel("mean KL divergence from full precision")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    save_plot(path, draw, title)


def write_results(out: Path, fp: Row, rows: list[Row], meta: dict, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(
        json.dumps({"meta": meta, "full_precision": asdict(fp), "rows": [asdict(r) for r in rows]}, indent=1)
    )
    (out / "compare.md").write_text(f"{title}\n\n{markdown(fp, rows)}\n")
    plot(rows, out / "compare.png", title)
