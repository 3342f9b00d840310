"""Quantized mixture-of-experts layers in vLLM: a fused-MoE quant method for easyquant experts.

vLLM's MoE runner routes (router logits, top-k, renormalization) and hands the method each
token's experts and weights; :meth:`EasyQuantMoEMethod.apply` runs every expert some token
picked on those tokens, as transformers' experts loop does (:class:`~easyquant.runtime.nn.EasyQuantExperts`):
``gate_up_proj`` (or ``up_proj``), the layer's activation, ``down_proj``, weighted, added back.
Each expert's matrices are :class:`EasyQuantLinear` modules, so they take the same kernels as
every other quantized linear (Triton on CUDA, torch's int4 kernel or dequantization on the CPU).

Loading: vLLM's experts loader maps checkpoint names onto dense ``w13``/``w2`` tensors, which
packed codes and CSR outliers are not. The plugin's name mapper marks easyquant's expert
tensors (``experts.gate_up_proj.3.packed`` -> ``experts.easyquant_gate_up_proj.3.packed``, so no
model's own mapping rewrites them), and the method gives its layer a loader of its own that
keeps each expert's tensors as stored: only this rank's experts under expert parallelism.
After loading, each expert is cut for this tensor-parallel rank without dequantizing (the rows
of its slice of the intermediate size in both halves of ``gate_up_proj``, stacked; the same
columns of ``down_proj``); the runner then sums the ranks' partial outputs as for any MoE layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.activation import apply_moe_activation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from ..core.qweight import QuantizedWeight
from ..core.shards import stack_rows, take_cols, take_rows
from ..errors import EasyQuantError
from ..runtime.nn import EasyQuantLinear
from .hf import EasyQuantConfig

MARK = "easyquant_"  # what the name mapper puts before an expert parameter's name
EXPERT_TENSOR = re.compile(rf"^{MARK}(gate_up_proj|up_proj|down_proj)\.(\d+)\.(\w+)$")


def mark_expert_tensors() -> dict[re.Pattern, str]:
    """The name mapper's rule: ``.experts.{parameter}.{e}.`` -> ``.experts.easyquant_{parameter}.{e}.``."""
    return {re.compile(r"\.experts\.(gate_up_proj|up_proj|down_proj)\.(\d+)\."): rf".experts.{MARK}\1.\2."}


class EasyQuantMoEMethod(FusedMoEMethodBase):
    """The experts of one checkpoint module (``model.layers.0.mlp.experts``), served by vLLM."""

    def __init__(self, config: EasyQuantConfig, module: str, moe: Any):
        super().__init__(moe)
        self.config, self.module = config, module
        self.counts: dict[str, list[int]] = config.modules[module]["outliers"]  # parameter -> outliers per expert
        self.names = config.module_tensors(module)
        self.up = "gate_up_proj" if moe.is_act_and_mul else "up_proj"
        if set(self.counts) != {self.up, "down_proj"}:
            raise EasyQuantError(
                f"{module}: the checkpoint quantized experts' {sorted(self.counts)}, but vLLM's layer runs "
                f"{self.up} and down_proj"
            )

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        layer.easyquant_stored = {}  # (parameter, local expert) -> {tensor name: tensor as stored}
        layer.easyquant_sizes = (hidden_size, intermediate_size_per_partition, params_dtype)
        layer.easyquant_device = torch.empty(0).device  # vLLM builds the model under its device
        # An instance attribute, so the runner's ``routed_experts.load_weights(...)`` reaches it.
        layer.load_weights = lambda weights: self._load(layer, weights)

    def _load(self, layer: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
        for name, tensor in weights:
            match = EXPERT_TENSOR.match(name)
            if match is None or match[3] not in self.names:
                raise EasyQuantError(f"{self.module}: checkpoint tensor {name!r} is not an easyquant expert tensor")
            param, expert = match[1], int(match[2])
            if expert >= len(self.counts.get(param, ())):
                raise EasyQuantError(f"{self.module}: checkpoint tensor {name!r} names an expert the config lacks")
            local = layer._map_global_expert_id_to_local_expert_id(expert)
            if local >= 0:  # another rank's expert otherwise
                layer.easyquant_stored.setdefault((param, local), {})[match[3]] = tensor.detach().clone()
            yield name

    def _stored(self, layer: nn.Module, param: str, local: int, cols: int) -> QuantizedWeight:
        t = layer.easyquant_stored.get((param, local), {})
        name = f"{self.module}.{param}[local expert {local}]"
        missing = [n for n in self.names if n not in t]
        if missing:
            raise EasyQuantError(f"{name}: the checkpoint lacks its tensors {missing}")
        return self.config.stored_weight(self.module, t, (t["packed"].shape[0], cols), layer.easyquant_sizes[2], name)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        hidden, part, _ = layer.easyquant_sizes
        tp, rank = self.moe.tp_size, self.moe.tp_rank
        inter = part * tp
        lo, hi = rank * part, (rank + 1) * part
        halves = 2 if self.up == "gate_up_proj" else 1
        experts: dict[str, list[EasyQuantLinear]] = {self.up: [], "down_proj": []}
        for local in range(layer.local_num_experts):
            up = self._stored(layer, self.up, local, hidden)
            if up.shape[0] != halves * inter:
                raise EasyQuantError(
                    f"{self.module}.{self.up}[local expert {local}]: {up.shape[0]} rows, expected {halves * inter}"
                )
            down = self._stored(layer, "down_proj", local, inter)
            if tp > 1:  # this rank's slice of the intermediate size: rows of each half, columns of down
                up = stack_rows([take_rows(up, h * inter + lo, h * inter + hi) for h in range(halves)])
                down = take_cols(down, lo, hi)
            for param, qw in ((self.up, up), ("down_proj", down)):
                experts[param].append(EasyQuantLinear.from_quantized(qw.to(layer.easyquant_device), name=self.module))
        layer.easyquant_stored = None
        layer.easyquant = nn.ModuleDict({p: nn.ModuleList(m) for p, m in experts.items()})

    def get_fused_moe_quant_config(self, layer: nn.Module) -> None:
        return None  # no vLLM kernel runs these experts: apply does

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        ids = topk_ids.long()
        if layer.expert_map is not None:  # global expert -> this rank's slot, -1 for other ranks' experts
            ids = layer.expert_map[ids]
        up, down = layer.easyquant[self.up], layer.easyquant["down_proj"]
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            tokens, slot = torch.where(ids == e)
            weight = topk_weights[tokens, slot, None].to(x.dtype)
            xs = x[tokens] * weight if layer.apply_router_weight_on_input else x[tokens]
            h = up[e](xs)
            act = h.new_empty(h.shape[0], h.shape[1] // 2 if self.moe.is_act_and_mul else h.shape[1])
            apply_moe_activation(layer.activation, act, h)
            y = down[e](act)
            out.index_add_(0, tokens, y if layer.apply_router_weight_on_input else y * weight)
        return out
