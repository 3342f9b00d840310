"""The checkpoint format: its version history, and the ``quantization_config`` that
``config.json`` carries (settings, options, each module's outlier counts)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.fold import Fold
from ..core.quantize import QuantConfig
from .targets import Target

# 2: asymmetric weights (a uint8 zero point per row or group beside the scales).
# 3: dual-axis weights (an fp16 scale per input column).
# 4: a bit width and group size per module (--target-bpw).
# 5: fractional zero points (uint8 in steps of 2^-(8 - bits), --fractional-zero).
# 6: compact row pointers (the narrowest type holding the outlier count; none without outliers).
# 7: folded column scales: a module's own ``"col_scale": false`` (its scale is in the model:
#    norms and the rows of the linear before it, written scaled), and the list of ``folds``.
COMPACT_ROWPTR = 6
FOLDED = 7
FORMAT_VERSION = 7


def format_version(config: QuantConfig, per_module: bool = False, folded: bool = False) -> int:
    """The oldest format that holds weights made with ``config``, row pointers aside (a reader
    refuses a checkpoint that claims an older one); ``per_module``: settings vary by module;
    ``folded``: some modules' column scales are folded into the model."""
    if folded:
        return FOLDED
    if config.fractional_zero:
        return 5
    return 4 if per_module else 3 if config.col_scale else 2 if config.asymmetric else 1


@dataclass(frozen=True)
class Options:
    """Everything that decides the output, beside the quantizer settings."""

    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_bytes: int = 2 * 1024**3
    target_bpw: float | None = None  # a setting per module (easyquant.core.allocate) within this budget
    # Column scales folded into the model where its graph allows (easyquant.core.fold: none, rows,
    # all); not under a bits budget, whose plan is scored on the weights as they are.
    fold: str = "rows"


def quantization_config_dict(
    config: QuantConfig,
    options: Options,
    targets: list[Target],
    layers: list[dict],
    per_module: bool = False,
    folds: list[Fold] = (),
) -> dict:
    """The checkpoint's ``quantization_config``: settings, and each quantized module with its
    outlier count (an experts module: per parameter, one count per expert); ``per_module``: with
    each module's bits and group size (the row's length: per channel) too; a folded module
    with ``"col_scale": false``, and the ``folds`` that changed the model."""
    rows = {r["module"]: r for r in layers}
    outliers = {m: r["outliers"] for m, r in rows.items()}
    modules: dict[str, dict] = {}
    for t in targets:
        if t.expert is None:
            modules[t.module] = {"outliers": outliers[t.module]}
            if rows[t.module].get("folded"):
                modules[t.module]["col_scale"] = False
            if per_module:
                modules[t.module] |= {"bits": rows[t.module]["bits"], "group_size": rows[t.module]["group_size"]}
        else:
            experts, param, e = t.expert
            counts = modules.setdefault(experts, {"outliers": {}})["outliers"].setdefault(param, [])
            counts.extend([None] * (e + 1 - len(counts)))
            counts[e] = outliers[t.module]
            if per_module:  # one setting for the module's experts (the plan's unit)
                # Groups as wide as the widest matrix needs: a reader's min(group, columns) gives each its own.
                group = max(rows[t.module]["group_size"], modules[experts].get("group_size", 0))
                modules[experts] |= {"bits": rows[t.module]["bits"], "group_size": group}
    return {
        "quant_method": "easyquant",
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        **({"target_bpw": options.target_bpw} if per_module else {}),
        **({"folds": [{"into": f.into, "readers": list(f.readers)} for f in folds]} if folds else {}),
        "skip": list(options.skip),
        "include": list(options.include),
        "modules": modules,
    }
