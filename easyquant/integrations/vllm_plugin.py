"""vLLM integration, out of tree: ``pip install easyquant`` registers, through the
``vllm.general_plugins`` entry point, a quantization config named ``easyquant``; a checkpoint
whose ``quantization_config.quant_method`` is ``easyquant`` selects it with no flag, so
``vllm serve OUT`` and ``LLM(model=OUT)`` just work.

Loading: each quantized linear gets the checkpoint's tensors (packed codes, scales, CSR
outliers, zeros for asymmetric weights, column scales for dual-axis ones) as parameters whose
loader keeps what it is given, unsharded, per logical shard (vLLM fuses q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj``, and tells the loader which shard each tensor is). After loading, each shard
is cut for this tensor-parallel rank without dequantizing (:mod:`easyquant.core.shards`: rows for
column-parallel layers, columns for row-parallel ones, outliers partitioned with them), the
shards are stacked into one weight (dual-axis shards with column scales of their own stay
apart, their outputs joined), and the layer runs it through :class:`EasyQuantLinear`,
which picks the Triton kernel on CUDA and torch's int4 kernel or dequantization on the CPU.
Layers the checkpoint left in full precision (``lm_head``, skipped modules) keep vLLM's own
unquantized method. Quantized mixture-of-experts layers get :mod:`.vllm_moe`'s fused-MoE method.

Names: the checkpoint names modules as transformers' models do; vLLM's models keep the names of
the checkpoints on the Hub, which transformers renames on load for some families (Mixtral's
``block_sparse_moe`` is its ``mlp``). The config undoes those renamings for the model type it is
given (``maybe_update_config``), both in the tensors' names and in the layers it looks up.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from ..checkpoint.targets import conversions
from ..core.qweight import QuantizedWeight
from ..core.shards import stack_rows, take_cols, take_rows
from ..errors import EasyQuantError
from ..runtime.nn import EasyQuantLinear
from .hf import METHOD, EasyQuantConfig
from .vllm_moe import EasyQuantMoEMethod, mark_expert_tensors

# Layers vLLM fuses, by the names of their parts (models add their own in packed_modules_mapping).
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class EasyQuantVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config``, validated as transformers' loader validates it."""

    def __init__(self, config: EasyQuantConfig):
        super().__init__()
        self.config = config
        self.renamings: list[tuple[str, str]] = []  # (vLLM's name, the checkpoint's): see maybe_update_config

    def get_name(self) -> str:
        return METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # Triton on any CUDA GPU; torch on the CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EasyQuantVllmConfig:
        return cls(EasyQuantConfig(**{k: v for k, v in config.items() if k != "quant_method"}))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        if hf_config is not None:
            self.renamings = conversions(hf_config.model_type)[0]

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """vLLM's base mapper, plus: expert tensors marked for the MoE method's loader, and the
        checkpoint's (transformers') names put back to vLLM's."""
        back = {re.compile(re.escape(new)): old for old, new in self.renamings}
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex=mark_expert_tensors() | back
        )

    def _checkpoint_name(self, prefix: str) -> str:
        for old, new in self.renamings:
            prefix = prefix.replace(old, new)
        return prefix

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethodBase | EasyQuantMoEMethod | None:
        if isinstance(layer, RoutedExperts):
            module = self._checkpoint_name(prefix)
            if isinstance(self.config.modules.get(module, {}).get("outliers"), dict):
                return EasyQuantMoEMethod(self.config, module, layer.moe_config)
            return None  # vLLM's unquantized experts
        if not isinstance(layer, LinearBase):
            return None
        name = self._checkpoint_name(prefix)
        fused = FUSED | self.packed_modules_mapping
        parts = [name] if name in self.config.modules else _checkpoint_modules(name, fused)
        listed = [p in self.config.modules for p in parts]
        if all(listed):
            return EasyQuantLinearMethod(self.config, parts)
        if any(listed):
            raise EasyQuantError(f"vLLM fuses {parts} into {prefix}, but the checkpoint quantized only some of them")
        return UnquantizedLinearMethod()


def _checkpoint_modules(prefix: str, packed: dict[str, list[str]]) -> list[str]:
    """The checkpoint's module names behind a vLLM layer (``...qkv_proj`` -> q, k, v)."""
    head, _, last = prefix.rpartition(".")
    return [f"{head}.{p}" if head else p for p in packed[last]] if last in packed else [prefix]


def _shard_order(layer: torch.nn.Module, shards: dict) -> list:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    return sorted(shards, key=lambda s: -1 if s is None else s)


class EasyQuantLinearMethod(LinearMethodBase):
    def __init__(self, config: EasyQuantConfig, modules: list[str]):
        self.config = config
        self.modules = modules  # the checkpoint's modules behind the layer, in shard order
        kinds = {config.module_tensors(m) for m in modules}
        if len(kinds) > 1:  # a fold covers every linear that reads one input: q, k, v alike
            raise EasyQuantError(f"vLLM fuses {modules}, but only some of them have their column scales folded")
        (self.names,) = kinds

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        layer.easyquant_shards = {}  # shard id -> {tensor name: full tensor}
        layer.easyquant_sizes = (input_size_per_partition, list(output_partition_sizes), input_size, params_dtype)

        def keep(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            shard_id = getattr(loaded, "shard_id", None) if shard_id is None else shard_id
            layer.easyquant_shards.setdefault(shard_id, {})[param.easyquant_name] = loaded.detach().clone()

        for name in self.names:
            param = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # on vLLM's device for the layer
            set_weight_attrs(param, {"weight_loader": keep, "easyquant_name": name})
            layer.register_parameter(name, param)

    def _local(self, layer: torch.nn.Module, index: int, shard: object, t: dict[str, torch.Tensor]) -> QuantizedWeight:
        """One logical shard, full as stored, cut for this tensor-parallel rank."""
        local_cols, local_rows, cols, dtype = layer.easyquant_sizes
        rows = t["packed"].shape[0]
        name = f"{layer.prefix}[{shard}]" if shard is not None else layer.prefix
        qw = self.config.stored_weight(self.modules[index], t, (rows, cols), dtype, name)
        if isinstance(layer, RowParallelLinear) and local_cols != cols:
            return take_cols(qw, layer.tp_rank * local_cols, (layer.tp_rank + 1) * local_cols)
        want = local_rows[index]
        if want == rows:
            return qw
        rank = layer.tp_rank
        if isinstance(layer, QKVParallelLinear) and shard in ("k", "v"):
            rank //= layer.num_kv_head_replicas
        return take_rows(qw, rank * want, (rank + 1) * want)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards = layer.easyquant_shards
        order = _shard_order(layer, shards)
        names = self.names
        missing = [s for s in order if set(shards.get(s, {})) != set(names)]
        if missing or len(order) != len(layer.easyquant_sizes[1]):
            raise EasyQuantError(f"{layer.prefix}: the checkpoint lacks quantized tensors of shards {missing}")
        parts = [self._local(layer, i, s, shards[s]) for i, s in enumerate(order)]
        device = layer.packed.device
        for name in names:
            delattr(layer, name)
        layer.easyquant_shards = None
        # Shards (q, k, v) that scale the shared input by their own column scales, or that have
        # their own bits or groups (--target-bpw), each run on their own and the outputs are
        # joined, as the fused layer's would be.
        scales = [p.col_scales for p in parts]
        joint = len({(p.bits, p.group_size) for p in parts}) == 1 and (
            scales[0] is None or all(torch.equal(c, scales[0]) for c in scales)
        )
        layer.easyquant = torch.nn.ModuleList(
            EasyQuantLinear.from_quantized(qw.to(device), name=layer.prefix)
            for qw in ([stack_rows(parts)] if joint else parts)
        )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        mods = layer.easyquant
        y = mods[0](x) if len(mods) == 1 else torch.cat([m(x) for m in mods], dim=-1)
        return y + bias if bias is not None else y


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in every process it starts)."""
    register_quantization_config(METHOD)(EasyQuantVllmConfig)
