"""Which tensors of a checkpoint to quantize: the nn.Linear weights inside the model's blocks,
and the experts of mixture-of-experts blocks, one expert matrix at a time.

The architecture is built from ``config.json`` on the meta device (no memory, no weights),
so the decision rests on what each tensor really is rather than on its name. A Linear is
"inside the blocks" when it lives under an ``nn.ModuleList`` (``layers``, ``h``,
``encoder.layer``, ...); embeddings, norms and ``lm_head`` stay as they are unless
``include`` names them, and so do routers (a Linear named ``gate``, ``router`` or ``*_gate``).

Experts: transformers 5 keeps them as fused 3-D parameters (``experts.gate_up_proj`` of shape
``(experts, 2 * intermediate, hidden)``, ``experts.down_proj``; transposed in some families).
Each expert's matrix is a target of its own, read from the fused tensor on disk or, for
checkpoints that store one 2-D tensor per expert (``experts.3.w1.weight``), from those tensors
as transformers' own conversion mapping fuses them. A ``skip`` or ``include`` pattern that selects nothing is an error,
never silence: a typo would otherwise quantize what the user meant to keep, and a head tied
to the embedding has no tensor of its own to quantize.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.fold import Fold
from ..errors import EasyQuantError
from .folds import find_folds
from .source import ExpertSlice, Source, Stacked, TensorRef, WeightSource

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One matrix to quantize: a Linear's weight, or one expert of a fused experts parameter
    (then ``module`` is ``{experts module}.{parameter}.{expert}`` and ``expert`` says so)."""

    module: str  # the quantized tensors' name prefix, as the checkpoint's keys spell it
    in_features: int
    out_features: int
    has_bias: bool
    source: WeightSource
    expert: tuple[str, str, int] | None = None  # (experts module, parameter, index)


def build_meta_model(source: Source) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.folder)
    except (ValueError, KeyError) as e:
        raise EasyQuantError(
            f"{source.folder / 'config.json'}: transformers {transformers.__version__} does not know this model "
            f"(model_type {source.config.get('model_type')!r}): {e}"
        ) from None
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    classes = [c for c in classes if c is not None] + [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        except (ValueError, KeyError, TypeError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise EasyQuantError(f"{source.folder}: cannot build the model from config.json ({'; '.join(errors)})")


def _regex_match(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a glob such as "*.down_proj" is no regular expression
        return False


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or _regex_match(p, name) for p in patterns)


def is_router(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router") or last.endswith("_gate")


def block_linears(
    model: nn.Module, skip: tuple[str, ...] = (), include: tuple[str, ...] = ()
) -> list[tuple[str, nn.Linear]]:
    """The model's Linear modules inside its blocks, routers aside (plus ``include``, minus
    ``skip``). ``skip`` and ``include`` are globs or regular expressions over module names
    (``*.mlp.down_proj``, ``lm_head``)."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and ((any(name.startswith(f"{ls}.") for ls in lists) and not is_router(name)) or _matches(name, include))
        and not _matches(name, skip)
    ]


def expert_params(model: nn.Module) -> list[tuple[str, str, nn.Parameter, bool]]:
    """``(experts module, parameter, parameter, transposed)`` for every fused 3-D experts
    parameter: modules transformers marks as experts (``use_experts_implementation``)."""
    out = []
    for name, mod in model.named_modules():
        if not hasattr(mod, "is_transposed") or not hasattr(mod, "has_gate"):
            continue
        for p in EXPERT_PARAMS:
            param = mod._parameters.get(p)
            if param is not None and param.dim() == 3:
                out.append((name, p, param, bool(mod.is_transposed)))
    return out


def expert_matrices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every expert's ``(out, in)`` matrix, named ``{module}.{parameter}[{e}]``, as a view into its
    fused parameter (a transposed view for transposed layouts): writing it writes the model."""
    out = []
    for module, param, p, transposed in expert_params(model):
        for e in range(p.shape[0]):
            out.append((f"{module}.{param}[{e}]", p.data[e].T if transposed else p.data[e]))
    return out


def _disk_names(name: str, prefix: str, renamings: list[tuple[str, str]]) -> list[str]:
    """How a checkpoint may spell the model's tensor ``name``: as is, without the base model
    prefix, or with transformers' renamings undone (``.mlp.`` -> ``.block_sparse_moe.``)."""
    names = [name, name.removeprefix(f"{prefix}.")] if prefix else [name]
    return names + [n.replace(new, old) for n in names for old, new in renamings if new in n]


def conversions(model_type: str) -> tuple[list[tuple[str, str]], list[tuple[list[str], str]]]:
    """transformers' load-time renamings and per-expert fusions for a model type, as plain
    ``(on disk, in the model)`` pairs (empty where transformers has none)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return [], []
    renamings, fusions = [], []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(conv.source_patterns), list(conv.target_patterns)
        if type(conv).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            renamings.append((sources[0], targets[0]))
        elif len(targets) == 1 and all("*" in s for s in sources):
            fusions.append((sources, targets[0]))
    return renamings, fusions


def _expert_sources(
    source: Source, full: str, param: nn.Parameter, transposed: bool, prefix: str, recipes: tuple
) -> list[WeightSource] | None:
    """Where each expert's ``(out, in)`` matrix of the model's parameter ``full`` is on disk:
    slices of the fused tensor, or that expert's own tensors stacked; None if neither is there."""
    experts, a, b = param.shape
    out_features, in_features = (b, a) if transposed else (a, b)
    renamings, fusions = recipes
    for key in _disk_names(full, prefix, renamings):
        ref = source.tensors.get(key)
        if ref is not None:
            if ref.shape != tuple(param.shape):
                raise EasyQuantError(f"{ref.file}: tensor {key} has shape {ref.shape}, expected {tuple(param.shape)}")
            return [ExpertSlice(ref, e, transposed) for e in range(experts)]
    for patterns, target in fusions:
        if transposed or not full.endswith(target):
            continue
        base, recipe = full[: -len(target)], []
        for e in range(experts):
            parts: list[TensorRef] = []
            for pattern in patterns:
                names = _disk_names(base + pattern.replace("*", str(e)), prefix, renamings)
                ref = next((source.tensors[n] for n in names if n in source.tensors), None)
                if ref is None:
                    break
                parts.append(ref)
            if len(parts) != len(patterns):
                break
            shapes = [p.shape for p in parts]
            if any(len(s) != 2 or s[1] != in_features for s in shapes) or sum(s[0] for s in shapes) != out_features:
                raise EasyQuantError(
                    f"{parts[0].file}: expert {e} of {full} is stored as {', '.join(p.key for p in parts)} of shapes "
                    f"{shapes}, which do not make its ({out_features}, {in_features}) matrix"
                )
            recipe.append(Stacked(tuple(parts)))
        if len(recipe) == experts:
            return recipe
    return None


def _tied_to(model: nn.Module, name: str) -> str | None:
    """The name of the parameter that module ``name``'s weight is tied to, if it is tied."""
    weight = model.get_submodule(name).weight
    return next(
        (n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and n != f"{name}.weight"), None
    )


@dataclass(frozen=True)
class Plan:
    """What to quantize, and how the model names the checkpoint's other tensors."""

    targets: list[Target]
    renamings: list[tuple[str, str]]  # transformers' load-time renamings: (on disk, in the model)
    folds: list[Fold]  # where column scales may fold into the model (checkpoint names)

    def output_name(self, key: str) -> str:
        """An untouched tensor's name in the output: the model's (``.block_sparse_moe.`` ->
        ``.mlp.``), so that a loader never has to rename it (transformers <= 5.17 then also
        skips the dtype cast ``from_pretrained(dtype=...)`` asks for)."""
        for old, new in self.renamings:
            key = re.sub(old, new, key)  # transformers' patterns are regular expressions
        return key


def find_targets(source: Source, skip: tuple[str, ...] = (), include: tuple[str, ...] = ()) -> Plan:
    """The checkpoint's tensors for :func:`block_linears` and every expert, sorted by name."""
    model = build_meta_model(source)
    prefix = getattr(model, "base_model_prefix", "")
    experts = expert_params(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + [f"{m}.{p}" for m, p, _, _ in experts]
    for flag, patterns in (("--skip", skip), ("--include", include)):
        for p in patterns:
            if not any(_matches(n, (p,)) or _matches(n.removeprefix(f"{prefix}."), (p,)) for n in names):
                raise EasyQuantError(
                    f"{flag} {p!r} matches no linear layer or experts of this model (e.g. {names[-1]!r})"
                )

    def key_of(name: str) -> str:  # the checkpoint's name for a module (which may omit the base prefix)
        if f"{name}.weight" not in source.tensors and prefix and name.startswith(f"{prefix}."):
            return name.removeprefix(f"{prefix}.")
        return name

    targets = []
    for name, mod in block_linears(model, skip, include):
        key = key_of(name)
        ref = source.tensors.get(f"{key}.weight")
        if ref is None:
            tied = _tied_to(model, name)
            why = f"is tied to {tied} and has no tensor of its own" if tied else "is not stored in the checkpoint"
            if _matches(name, include):
                raise EasyQuantError(
                    f"--include selects {name}, whose weight {why}: there is nothing to quantize; "
                    "leave it out (the tied tensor stays in full precision)"
                )
            warnings.warn(f"{source.folder}: {name} {why}; it stays as it is", stacklevel=2)
            continue
        if ref.shape != (mod.out_features, mod.in_features):
            raise EasyQuantError(
                f"{ref.file}: tensor {ref.key} has shape {ref.shape}, expected {(mod.out_features, mod.in_features)}"
            )
        targets.append(Target(key, mod.in_features, mod.out_features, mod.bias is not None, ref))
    recipes = conversions(model.config.model_type)
    for module, param_name, param, transposed in experts:
        full = f"{module}.{param_name}"
        if _matches(full, skip) or _matches(module, skip):
            continue
        recipe = _expert_sources(source, full, param, transposed, prefix, recipes)
        if recipe is None:
            warnings.warn(
                f"{source.folder}: found no tensors for {full} on disk; its experts stay as they are", stacklevel=2
            )
            continue
        # Named as the model spells it (the fused name), with the base prefix if the checkpoint has it.
        with_prefix = not prefix or recipe[0].keys[0].startswith(f"{prefix}.")
        base = full if with_prefix else full.removeprefix(f"{prefix}.")
        out_features, in_features = (param.shape[2], param.shape[1]) if transposed else param.shape[1:]
        for e, src in enumerate(recipe):
            expert = (base.rsplit(".", 1)[0], param_name, e)
            targets.append(Target(f"{base}.{e}", in_features, out_features, False, src, expert))
    if not targets:
        raise EasyQuantError(f"{source.folder}: found no linear layers to quantize (skip={list(skip)})")
    modules = {t.module for t in targets}
    folds = [
        replace(f, into=key_of(f.into), readers=tuple(key_of(r) for r in f.readers))
        for f in find_folds(model, lambda name: key_of(name) in modules)
    ]
    return Plan(sorted(targets, key=lambda t: t.expert or (t.module,)), recipes[0], folds)
