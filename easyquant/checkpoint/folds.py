"""Where a model lets column scales fold away (:mod:`easyquant.core.fold`), found in its modules.

Only architectures whose graph is known to allow it:

- pre-norm decoders whose RMSNorm multiplies by its weight (``llama``, ``mistral``, ``qwen2``,
  ``qwen3``; not Gemma's ``1 + weight``): ``input_layernorm`` -> q/k/v,
  ``post_attention_layernorm`` -> gate/up, v_proj -> o_proj (grouped-query heads tied),
  up_proj -> down_proj;
- BERT encoders: value -> attention.output.dense only (their LayerNorms also feed the residual,
  so a scale there would change it; down_proj's input comes through GELU, which no scale crosses).

Every other linear keeps its own column scale, applied at run time.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.fold import Fold

PRE_NORM_DECODERS = ("llama", "mistral", "qwen2", "qwen3")
ENCODERS = ("bert",)


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return mod if isinstance(mod, nn.Linear) else None


def _has_bias(model: nn.Module, name: str) -> bool:
    return getattr(model.get_submodule(name), "bias", None) is not None


def _decoder_folds(model: nn.Module, layer: str) -> list[Fold]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    qkv = tuple(f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj"))
    gate_up = (f"{mlp}.gate_proj", f"{mlp}.up_proj")
    return [
        Fold(f"{layer}.input_layernorm", qkv, bias=_has_bias(model, f"{layer}.input_layernorm")),
        Fold(qkv[2], (f"{attn}.o_proj",), True, _has_bias(model, qkv[2]), heads // kv, head_dim),
        Fold(f"{layer}.post_attention_layernorm", gate_up, bias=_has_bias(model, f"{layer}.post_attention_layernorm")),
        Fold(gate_up[1], (f"{mlp}.down_proj",), True, _has_bias(model, gate_up[1])),
    ]


def find_folds(model: nn.Module, quantized: Callable[[str], bool]) -> list[Fold]:
    """Every fold of ``model`` (names as the model spells them) whose linears are all
    ``quantized`` (a linear left in full precision keeps the model's input as it is)."""
    kind = getattr(model.config, "model_type", None)
    folds: list[Fold] = []
    for name, mod in model.named_modules():
        if kind in PRE_NORM_DECODERS and hasattr(mod, "input_layernorm") and hasattr(mod, "post_attention_layernorm"):
            folds += _decoder_folds(model, name)
        elif kind in ENCODERS and name.endswith(".attention") and hasattr(mod, "self") and hasattr(mod, "output"):
            folds.append(Fold(f"{name}.self.value", (f"{name}.output.dense",), True, True))
    return [
        f
        for f in folds
        if all(_linear(model, r) is not None and quantized(r) for r in f.readers)
        and (not f.rows or (_linear(model, f.into) is not None and quantized(f.into)))
    ]
