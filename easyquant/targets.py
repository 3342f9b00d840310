"""Which tensors of a checkpoint to quantize: the nn.Linear weights inside the model's blocks.

The architecture is built from ``config.json`` on the meta device (no memory, no weights),
so the decision rests on what each tensor really is rather than on its name. A Linear is
"inside the blocks" when it lives under an ``nn.ModuleList`` (``layers``, ``h``,
``encoder.layer``, ...); embeddings, norms and ``lm_head`` stay as they are unless
``include`` names them. A ``skip`` or ``include`` pattern that selects nothing is an error,
never silence: a typo would otherwise quantize what the user meant to keep, and a head tied
to the embedding has no tensor of its own to quantize.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EasyQuantError
from .source import Source


@dataclass(frozen=True)
class Target:
    module: str  # module name, as the checkpoint's keys spell it
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"


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


def block_linears(
    model: nn.Module, skip: tuple[str, ...] = (), include: tuple[str, ...] = ()
) -> list[tuple[str, nn.Linear]]:
    """The model's Linear modules inside its blocks (plus ``include``, minus ``skip``).
    ``skip`` and ``include`` are globs or regular expressions over module names
    (``*.mlp.down_proj``, ``lm_head``)."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and (any(name.startswith(f"{ls}.") for ls in lists) or _matches(name, include))
        and not _matches(name, skip)
    ]


def _tied_to(model: nn.Module, name: str) -> str | None:
    """The name of the parameter that module ``name``'s weight is tied to, if it is tied."""
    weight = model.get_submodule(name).weight
    return next(
        (n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and n != f"{name}.weight"), None
    )


def find_targets(source: Source, skip: tuple[str, ...] = (), include: tuple[str, ...] = ()) -> list[Target]:
    """The checkpoint's tensors for :func:`block_linears`, sorted by name."""
    model = build_meta_model(source)
    prefix = getattr(model, "base_model_prefix", "")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for flag, patterns in (("--skip", skip), ("--include", include)):
        for p in patterns:
            if not any(_matches(n, (p,)) or _matches(n.removeprefix(f"{prefix}."), (p,)) for n in linears):
                raise EasyQuantError(f"{flag} {p!r} matches no linear layer of this model (e.g. {linears[-1]!r})")
    targets = []
    for name, mod in block_linears(model, skip, include):
        key = name
        if f"{key}.weight" not in source.tensors and prefix and key.startswith(f"{prefix}."):
            key = key.removeprefix(f"{prefix}.")
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
        targets.append(Target(key, mod.in_features, mod.out_features, mod.bias is not None))
    if not targets:
        raise EasyQuantError(f"{source.folder}: found no linear layers to quantize (skip={list(skip)})")
    return sorted(targets, key=lambda t: t.weight_key)
