"""transformers integration: ``import easyquant`` lets ``from_pretrained`` load easyquant checkpoints.

The checkpoint's ``quantization_config`` lists every quantized module with its outlier count;
before the weights load, those ``nn.Linear`` modules are swapped for :class:`EasyQuantLinear`
with tensors of exactly the stored shapes, and the state dict then loads into them as is.
Pinned to transformers >=5.0,<6 in pyproject.toml; tested with 5.23 and 5.17 (on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn import EasyQuantLinear
from .pipeline import FORMAT_VERSION

METHOD = "easyquant"


class EasyQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an easyquant checkpoint (written by :func:`quantize_model`)."""

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        modules: dict[str, dict] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ):
        self.quant_method = METHOD
        self.bits, self.group_size, self.modules = bits, group_size, modules or {}
        self.format_version = format_version
        if format_version > FORMAT_VERSION:
            raise ValueError(f"this checkpoint has easyquant format {format_version}; upgrade easyquant to read it")
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class EasyQuantHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads checkpoints made by `easyquant quantize`; it does not quantize on load

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("easyquant quantizes with `easyquant quantize SRC OUT`; from_pretrained loads the result")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replace_linears(model, self.quantization_config, getattr(model.config, "dtype", None) or torch.float16)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in model.named_modules():
            if isinstance(module, EasyQuantLinear):
                module.quantized_weight().check(name)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def replace_linears(model: nn.Module, qconfig: EasyQuantConfig, dtype: torch.dtype) -> None:
    """Swap each module the config lists for an empty :class:`EasyQuantLinear` of the stored shapes."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for module, info in qconfig.modules.items():
        name = module if module in names else f"{prefix}.{module}"
        lin = names.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"easyquant checkpoint lists module {module!r}, which this model has no Linear for")
        device = lin.weight.device
        q = EasyQuantLinear(
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            qconfig.bits,
            qconfig.group_size or lin.in_features,
            info["outliers"],
            dtype,
            device,
        )
        model.set_submodule(name, q)


def register() -> None:
    """Register the method with transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(EasyQuantConfig)
        register_quantizer(METHOD)(EasyQuantHfQuantizer)
