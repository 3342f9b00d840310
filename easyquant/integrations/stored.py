"""An easyquant checkpoint read back for export, validated exactly as loading it is.

Exports (GGUF, compressed-tensors) stream a checkpoint one tensor at a time into another
format. Before a byte of data is read, the config is validated key by key, a model is built on
the meta device with the quantized modules in place, and every safetensors header is checked
against it; each quantized weight is bounds-checked as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.source import Source, open_safetensors_folder
from ..core.qweight import QuantizedWeight
from ..errors import EasyQuantError
from .hf import EasyQuantConfig, _model_name, replace_linears, verify_files


@dataclass(frozen=True)
class StoredCheckpoint:
    """The checkpoint's tensors, its quantization and transformers configs, the meta-device
    model, the model's tensor names in order, and the quantized modules (model name ->
    checkpoint name) and stored tensors (model name -> checkpoint name; checkpoints may omit the
    base model prefix)."""

    folder: Path
    source: Source
    qconfig: EasyQuantConfig
    cfg: object
    model: nn.Module
    order: list[str]
    quantized: dict[str, str]
    stored: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path, what: str) -> StoredCheckpoint:
        """Read and validate ``folder``; ``what`` names the export in the refusal of a
        mixture-of-experts checkpoint."""
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        source = open_safetensors_folder(folder)
        qcfg = source.config.get("quantization_config")
        if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "easyquant":
            why = "not an easyquant checkpoint (no easyquant quantization_config)"
            raise EasyQuantError(f"{folder}/config.json: {why}")
        qconfig = EasyQuantConfig(**{k: v for k, v in qcfg.items() if k != "quant_method"})
        if any(isinstance(m["outliers"], dict) for m in qconfig.modules.values()):
            raise EasyQuantError(f"{folder}: mixture-of-experts checkpoints cannot be exported to {what} yet")
        cfg = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        order = [k for k in model.state_dict() if not k.endswith("inv_freq")]
        replace_linears(model, qconfig, torch.float16)
        verify_files(model, qconfig, sorted({r.file for r in source.tensors.values()}))
        modules = dict(model.named_modules())
        quantized = {_model_name(model, m, modules): m for m in qconfig.modules}
        prefix = f"{model.base_model_prefix}."
        stored = {k if k in order else prefix + k: k for k in source.tensors}
        return cls(folder, source, qconfig, cfg, model, order, quantized, stored)

    def shape(self, module: str) -> tuple[int, int]:
        m = self.model.get_submodule(module)
        return m.out_features, m.in_features

    def weight(self, module: str) -> QuantizedWeight:
        """The quantized weight of the model's ``module``, read and checked."""
        name, q = self.quantized[module], self.qconfig
        t = {n: self.source.tensors[f"{name}.{n}"].load() for n in q.module_tensors(name)}
        return q.stored_weight(name, t, self.shape(module), torch.float16, name)

    def dense(self, key: str) -> torch.Tensor:
        """A tensor easyquant left unquantized, by the model's name for it."""
        return self.source.tensors[self.stored[key]].load()
