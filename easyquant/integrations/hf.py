"""transformers integration: ``import easyquant`` lets ``from_pretrained`` load easyquant checkpoints.

The checkpoint's ``quantization_config`` lists every quantized module with its outlier count;
before the weights load, those ``nn.Linear`` modules are swapped for :class:`EasyQuantLinear`
with tensors of exactly the stored shapes, and the state dict then loads into them as is.

Nothing in a checkpoint is trusted: the quantization config is validated key by key (unknown
keys are refused), every safetensors header is parsed and checked against the model (names,
dtypes, shapes) before a byte of data is read or memory allocated, and after loading the CSR
outlier arrays are bounds-checked before any kernel can index memory with them. Each failure
is an :class:`EasyQuantError` naming the file, module or key.
Pinned to transformers >=5.0,<6 in pyproject.toml; tested with 5.24 and 5.17 (on the CPU).
"""

from __future__ import annotations

from pathlib import Path
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

from ..checkpoint.format import COMPACT_ROWPTR, FORMAT_VERSION, format_version
from ..checkpoint.source import DTYPE_OF
from ..checkpoint.st_io import read_header
from ..checkpoint.targets import EXPERT_PARAMS
from ..core.grid import zero_shift
from ..core.quantize import QuantConfig
from ..core.qweight import QuantizedWeight
from ..errors import EasyQuantError
from ..runtime.nn import EasyQuantExperts, EasyQuantLinear, tensor_names

METHOD = "easyquant"


def _is_int(v: object) -> bool:
    return type(v) is int


def _valid_outliers(v: object) -> bool:
    """A count (a Linear), or per fused experts parameter one count per expert."""
    if isinstance(v, dict):
        return bool(v) and all(
            p in EXPERT_PARAMS and isinstance(c, list) and c and all(_is_int(n) and n >= 0 for n in c)
            for p, c in v.items()
        )
    return _is_int(v) and v >= 0


SETTINGS = tuple(QuantConfig.__dataclass_fields__)  # recorded for the record; loading needs bits and groups
REQUIRED = ("format_version", "bits", "group_size", "modules")
KEYS = {"quant_method", *REQUIRED, "skip", "include", "target_bpw", "folds", *SETTINGS}
PER_MODULE = ("bits", "group_size")  # format 4: a module's own settings (--target-bpw)


def _valid_module(info: object) -> bool:
    """``{"outliers": ...}``, with the module's own ``bits`` and ``group_size`` (None: per channel;
    an experts module: one setting for all its experts) or neither, and ``"col_scale": false``
    where its column scale is folded into the model (format 7)."""
    if not isinstance(info, dict) or "outliers" not in info or not _valid_outliers(info["outliers"]):
        return False
    if info.get("col_scale", False) is not False:
        return False
    own = set(info) - {"outliers", "col_scale"}
    if not own:
        return True
    if own != set(PER_MODULE):
        return False
    group = info["group_size"]
    try:
        QuantConfig(bits=info["bits"], group_size=group)
    except (EasyQuantError, TypeError):
        return False
    return _is_int(info["bits"]) and (group is None or _is_int(group))


class EasyQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an easyquant checkpoint (written by :func:`quantize_model`),
    validated: every key known, every value of the right type and range."""

    def __init__(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - KEYS)
        if unknown:
            raise EasyQuantError(
                f"quantization_config: unknown keys {unknown} (an easyquant checkpoint has {sorted(KEYS)})"
            )
        missing = [k for k in REQUIRED if k not in kwargs]
        if missing:
            raise EasyQuantError(f"quantization_config: missing keys {missing}")
        version = kwargs["format_version"]
        if not _is_int(version) or version < 1:
            raise EasyQuantError(f"quantization_config: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise EasyQuantError(f"this checkpoint has easyquant format {version}; upgrade easyquant to read it")
        try:
            # a setting a checkpoint does not record is one its format predates: not used
            settings = QuantConfig(**{"col_scale": False} | {k: kwargs[k] for k in SETTINGS if k in kwargs})
        except (TypeError, ValueError) as e:
            raise EasyQuantError(f"quantization_config: {e}") from None
        modules = kwargs["modules"]
        if not isinstance(modules, dict) or not all(
            isinstance(k, str) and _valid_module(v) for k, v in modules.items()
        ):
            raise EasyQuantError(
                'quantization_config: modules must map module names to {"outliers": count >= 0}, or for experts to '
                '{"outliers": {parameter: [count >= 0 per expert]}} (format 4: with "bits" and "group_size" beside '
                "it)"
            )
        folds = kwargs.get("folds", [])
        if not isinstance(folds, list) or not all(
            isinstance(f, dict)
            and set(f) == {"into", "readers"}
            and isinstance(f["into"], str)
            and isinstance(f["readers"], list)
            and all(isinstance(r, str) for r in f["readers"])
            for f in folds
        ):
            raise EasyQuantError('quantization_config: folds must be a list of {"into": name, "readers": [names]}')
        target = kwargs.get("target_bpw")
        if target is not None and not (isinstance(target, int | float) and 0 < target <= 16):
            raise EasyQuantError(f"quantization_config: target_bpw must be a number of bits per weight, got {target!r}")
        for key in ("skip", "include"):
            if not isinstance(kwargs.get(key, []), list) or not all(isinstance(p, str) for p in kwargs.get(key, [])):
                raise EasyQuantError(f"quantization_config: {key} must be a list of patterns")
        self.quant_method = METHOD
        self.format_version = version
        folded = bool(folds) or any("col_scale" in v for v in modules.values())
        needed = format_version(settings, any("bits" in v for v in modules.values()), folded)
        if version < needed:
            raise EasyQuantError(f"quantization_config: these settings need format_version {needed} or later")
        self.bits, self.group_size, self.modules = settings.bits, settings.group_size, modules
        self.asymmetric, self.col_scale = settings.asymmetric, settings.col_scale
        self.fractional_zero = settings.fractional_zero
        self.settings = {k: kwargs[k] for k in (*SETTINGS, "skip", "include", "target_bpw", "folds") if k in kwargs}

    def module_settings(self, module: str) -> tuple[int, int | None]:
        """A checkpoint module's bits and group size (None: per channel): its own, or the checkpoint's."""
        info = self.modules[module]
        return (info["bits"], info["group_size"]) if "bits" in info else (self.bits, self.group_size)

    def module_col_scale(self, module: str) -> bool:
        """Whether a checkpoint module stores column scales (not where they are folded away)."""
        return self.modules[module].get("col_scale", self.col_scale)

    def module_tensors(self, module: str) -> tuple[str, ...]:
        """The names of a checkpoint module's quantized tensors."""
        return tensor_names(self.asymmetric, self.module_col_scale(module))

    def zero_shift(self, bits: int) -> int:
        """Fractional bits of the stored zero points of a ``bits``-bit module (format 5)."""
        return zero_shift(bits, self.fractional_zero)

    def stored_weight(
        self, module: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, name: str
    ) -> QuantizedWeight:
        """A checkpoint module's quantized weight of ``shape`` from its stored ``tensors`` (by
        tensor name), with the module's bits and groups, checked (errors name ``name``)."""
        names = self.module_tensors(module)
        bits, group_size = self.module_settings(module)
        qw = QuantizedWeight(*(tensors[n] for n in names[:5]), bits, group_size or shape[1], shape, dtype,
                             **{n: tensors[n] for n in names[5:]}, zero_shift=self.zero_shift(bits))  # fmt: skip
        qw.check(name)
        return qw

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            **self.settings,
            "bits": self.bits,
            "group_size": self.group_size,
            "modules": self.modules,
        }


class EasyQuantHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads checkpoints made by `easyquant quantize`; it does not quantize on load

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("easyquant quantizes with `easyquant quantize SRC OUT`; from_pretrained loads the result")

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        replace_linears(model, self.quantization_config, getattr(model.config, "dtype", None) or torch.float16)
        if checkpoint_files:
            verify_files(model, self.quantization_config, [Path(f) for f in checkpoint_files])

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
    """Swap each module the config lists for an empty :class:`EasyQuantLinear` (an experts
    module: :class:`EasyQuantExperts`) of the stored shapes, checked against the model."""
    names = dict(model.named_modules())

    def layer(
        module: str, rows: int, cols: int, bias: bool, outliers: int, device: torch.device, settings: tuple,
        col_scale: bool,
    ) -> EasyQuantLinear:  # fmt: skip
        if outliers > rows * cols:
            raise EasyQuantError(
                f"quantization_config: module {module!r} lists {outliers} outliers, more than its {rows}x{cols} weights"
            )
        bits, group_size = settings
        return EasyQuantLinear(
            cols,
            rows,
            bias,
            bits,
            group_size or cols,
            outliers,
            dtype,
            device,
            qconfig.asymmetric,
            col_scale,
            qconfig.zero_shift(bits),
            qconfig.format_version >= COMPACT_ROWPTR,
        )

    for module, info in qconfig.modules.items():
        name = _model_name(model, module, names)
        mod = names.get(name)
        if isinstance(info["outliers"], int):
            if not isinstance(mod, nn.Linear):
                raise EasyQuantError(
                    f"easyquant checkpoint lists module {module!r}, which this model has no Linear for"
                )
            q = layer(
                module,
                mod.out_features,
                mod.in_features,
                mod.bias is not None,
                info["outliers"],
                mod.weight.device,
                qconfig.module_settings(module),
                qconfig.module_col_scale(module),
            )
            model.set_submodule(name, q)
            continue
        layers = {}
        for param, counts in info["outliers"].items():
            weight = getattr(mod, param, None) if hasattr(mod, "is_transposed") else None
            if not isinstance(weight, nn.Parameter) or weight.dim() != 3 or weight.shape[0] != len(counts):
                raise EasyQuantError(
                    f"easyquant checkpoint lists {len(counts)} experts of {module}.{param}, which this model has no "
                    "fused experts parameter of that size for"
                )
            _, a, b = weight.shape
            rows, cols = (b, a) if mod.is_transposed else (a, b)
            layers[param] = [
                layer(
                    f"{module}.{param}.{e}",
                    rows,
                    cols,
                    False,
                    n,
                    weight.device,
                    qconfig.module_settings(module),
                    qconfig.col_scale,
                )
                for e, n in enumerate(counts)
            ]
        model.set_submodule(name, EasyQuantExperts(mod, layers))


def _quantized_layers(model: nn.Module, qconfig: EasyQuantConfig) -> dict[str, EasyQuantLinear]:
    """Each :class:`EasyQuantLinear` the config implies, by its name in the checkpoint."""
    names = dict(model.named_modules())
    out = {}
    for module in qconfig.modules:
        mod = names[_model_name(model, module, names)]
        for sub, layer in mod.named_modules():
            if isinstance(layer, EasyQuantLinear):
                out[f"{module}.{sub}" if sub else module] = layer
    return out


def _model_name(model: nn.Module, key: str, names: dict) -> str:
    """A checkpoint name as the model spells it (checkpoints may omit the base model prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    return key if key in names or not prefix else f"{prefix}.{key}"


def verify_files(model: nn.Module, qconfig: EasyQuantConfig, files: list[Path]) -> None:
    """Check every checkpoint file's header against the model before any data is read: each
    quantized module's tensors present with exactly the dtype and shape the format fixes, and
    every other tensor the model knows of the model's shape."""
    headers: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise EasyQuantError(f"{path}: easyquant checkpoints are safetensors; refusing to read this file")
        for key, (dtype, shape) in read_header(path).items():
            if key in headers:
                raise EasyQuantError(f"{path}: tensor {key} is also in {headers[key][0].name}")
            headers[key] = (path, dtype, shape)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set()
    for module, lin in _quantized_layers(model, qconfig).items():
        for t in (*lin.tensor_names, "bias"):
            param = getattr(lin, t)
            if param is None:
                continue
            key = f"{module}.{t}"
            expected.add(key)
            if key not in headers:
                raise EasyQuantError(f"the checkpoint has no tensor {key}, which its quantization_config implies")
            path, dtype, shape = headers[key]
            want = param.dtype if t != "bias" else None
            ok_dtype = DTYPE_OF[dtype] == want if want is not None else DTYPE_OF[dtype].is_floating_point
            if shape != tuple(param.shape) or not ok_dtype:
                raise EasyQuantError(
                    f"{path}: tensor {key} is {dtype} {list(shape)}, expected "
                    f"{want or 'a float'} {list(param.shape)} for this module"
                )
    unlisted = sorted(k for k in headers if k.rsplit(".", 1)[-1] in tensor_names(True, True) and k not in expected)
    if unlisted:
        raise EasyQuantError(f"the checkpoint holds {unlisted[0]}, of a module its quantization_config does not list")
    for key, (path, dtype, shape) in headers.items():
        param = None if key in expected else params.get(_model_name(model, key, params))
        if param is None:
            continue
        if shape != tuple(param.shape) or DTYPE_OF[dtype].is_floating_point != param.dtype.is_floating_point:
            raise EasyQuantError(
                f"{path}: tensor {key} is {dtype} {list(shape)}, the model's is {param.dtype} {list(param.shape)}"
            )


def register() -> None:
    """Register the method with transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(EasyQuantConfig)
        register_quantizer(METHOD)(EasyQuantHfQuantizer)
