"""``EasyQuantLinear``: an ``nn.Linear`` whose weight is a :class:`QuantizedWeight`.

It holds the packed codes, scales and CSR outliers as (frozen) parameters named as in the
checkpoint, so a state dict loads straight into it. On a GPU with Triton, inputs of up to
``KERNEL_MAX_ROWS`` rows (decode and short prefill) go through the fused kernel of
:mod:`easyquant.runtime.kernel`, which reads only the packed weight; longer inputs dequantize the
weight with its Triton dequantizer and use cuBLAS. On the CPU, bf16 inputs of up to
``CPU_INT4_MAX_ROWS`` rows times 2- to 4-bit weights go through torch's CPU int4 kernel
(:mod:`easyquant.runtime.cpu_kernel`; it keeps a second copy of the codes in its own layout, made on
the first call); everything else dequantizes the weight on the fly in torch. ``backend``
overrides the choice per module: ``"auto"``, ``"triton"`` (also on the CPU under
``TRITON_INTERPRET=1``) or ``"torch"`` (always dequantize in torch: the reference). The
Triton kernels are called as torch custom ops (:mod:`easyquant.runtime.ops`), so the module compiles
whole under ``torch.compile``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.groups import group_count
from ..core.packing import packed_cols
from ..core.qweight import QuantizedWeight, index_dtype, rowptr_layout
from ..errors import EasyQuantError
from . import cpu_kernel, kernel, ops

QUANTIZED_TENSORS = ("packed", "scales", "outlier_rowptr", "outlier_cols", "outlier_values")
BACKENDS = ("auto", "triton", "torch")
KERNEL_MAX_ROWS = 128
# Up to here torch's CPU int4 kernel beats dequantizing in torch; past 128 to 256 rows the
# dequantized weight's cost is spread thin enough (bench/cpu.py, "bf16 dequantize" column).
CPU_INT4_MAX_ROWS = 128


def tensor_names(asymmetric: bool, col_scale: bool = False) -> tuple[str, ...]:
    """The quantized tensors of a module, in :class:`QuantizedWeight`'s order: then ``zeros`` if
    asymmetric, then ``col_scales`` if dual-axis."""
    return QUANTIZED_TENSORS + ("zeros",) * asymmetric + ("col_scales",) * col_scale


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class EasyQuantLinear(nn.Module):
    backend: str = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        outliers: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        asymmetric: bool = False,
        col_scale: bool = False,
        zero_shift: int = 0,
        compact_rowptr: bool = True,  # False: row pointers as formats 1-5 stored them
    ):
        super().__init__()
        self.asymmetric, self.col_scale, self.zero_shift = asymmetric, col_scale, zero_shift
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, min(group_size, in_features), dtype
        self._view: tuple[tuple[nn.Parameter, ...], QuantizedWeight] | None = None  # see quantized_weight()
        self._int4: tuple[tuple[tuple[int, int], ...], cpu_kernel.Int4Weight] | None = None  # see int4_weight()
        self._int4_group = cpu_kernel.kernel_group(bits, (out_features, in_features), self.group_size)
        kw = {"device": device}
        self.packed = _frozen(torch.zeros(out_features, packed_cols(in_features, bits), dtype=torch.uint8, **kw))
        self.scales = _frozen(
            torch.zeros(out_features, group_count(in_features, self.group_size), dtype=torch.float16, **kw)
        )
        shape, ptr_dtype = rowptr_layout(out_features, outliers, compact_rowptr)
        self.outlier_rowptr = _frozen(torch.zeros(shape, dtype=ptr_dtype, **kw))
        self.outlier_cols = _frozen(torch.zeros(outliers, dtype=index_dtype(in_features), **kw))
        self.outlier_values = _frozen(torch.zeros(outliers, dtype=torch.float16, **kw))
        self.zeros = _frozen(torch.zeros_like(self.scales, dtype=torch.uint8)) if asymmetric else None
        self.col_scales = _frozen(torch.ones(in_features, dtype=torch.float16, **kw)) if col_scale else None
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None
        self.register_load_state_dict_pre_hook(EasyQuantLinear._check_incoming)

    def _check_incoming(self, state_dict: dict, prefix: str, *args: object) -> None:
        """``load_state_dict`` gate: the incoming quantized tensors must have this module's
        shapes and dtypes (``copy_`` would cast them silently) and pass
        :meth:`QuantizedWeight.check`, before they replace anything."""
        incoming = {n: state_dict.get(prefix + n) for n in self.tensor_names}
        if any(t is None for t in incoming.values()):
            return  # torch reports missing keys itself
        name = prefix.rstrip(".") or "EasyQuantLinear"
        for n, t in incoming.items():
            own = self._parameters[n]
            if not isinstance(t, torch.Tensor) or t.dtype != own.dtype or t.shape != own.shape:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise EasyQuantError(f"{name}.{n}: got {got}, expected {own.dtype} {list(own.shape)}")
        self._weight(tuple(incoming.values())).check(name)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, name: str = "weight"
    ) -> EasyQuantLinear:
        """A module holding ``qw`` (checked first, as every way in is)."""
        qw.check(name)
        rows, cols = qw.shape
        mod = cls(
            cols,
            rows,
            bias is not None,
            qw.bits,
            qw.group_size,
            qw.outlier_count,
            qw.dtype,
            qw.packed.device,
            qw.asymmetric,
            qw.col_scales is not None,
            qw.zero_shift,
        )
        for name, t in qw.tensors().items():
            getattr(mod, name).data = t
        if bias is not None:
            mod.bias.data = bias.detach().to(qw.dtype)
        return mod

    def quantized_weight(self) -> QuantizedWeight:
        """The module's parameters viewed as a :class:`QuantizedWeight`. Built once and kept while
        the parameter objects stay (``.to()`` and ``load_state_dict`` change their data in place):
        decode calls every linear once per token, so this sits on the GPU path's CPU time."""
        params = tuple(self._parameters[name] for name in self.tensor_names)
        if self._view is None or any(a is not b for a, b in zip(self._view[0], params, strict=True)):
            self._view = (params, self._weight(params))
        return self._view[1]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tensor_names(self.asymmetric, self.col_scale)

    def _weight(self, tensors: tuple[torch.Tensor, ...]) -> QuantizedWeight:
        shape = (self.out_features, self.in_features)
        extra = dict(zip(self.tensor_names[5:], tensors[5:], strict=True))
        return QuantizedWeight(
            *tensors[:5], self.bits, self.group_size, shape, self.dtype, **extra, zero_shift=self.zero_shift
        )

    def int4_weight(self) -> cpu_kernel.Int4Weight:
        """The weight in the CPU int4 kernel's layout, made on first use and again whenever a
        quantized tensor changes (a new tensor, or an in-place write such as ``load_state_dict``)."""
        key = tuple((t.data_ptr(), t._version) for t in map(self._parameters.__getitem__, self.tensor_names))
        if self._int4 is None or self._int4[0] != key:
            self._int4 = (key, cpu_kernel.repack(self.quantized_weight()))
        return self._int4[1]

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``: the quantized tensors move but keep their dtypes
        (a cast would round the fp16 scales and outliers, and leave a checkpoint off-format);
        a dtype change sets the compute dtype and the bias's. The CPU int4 copy is dropped."""
        quantized = {id(self._parameters[name]) for name in self.tensor_names}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if id(t) in quantized and out.dtype != t.dtype else out

        self._int4 = None
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.scales.device)).dtype
        return super()._apply(move_only, recurse)

    def path(self, x: torch.Tensor) -> str:
        """How ``forward`` multiplies ``x``: ``"fused"`` (the Triton matmul), ``"dequantize"``
        (the Triton dequantizer, then a dense matmul), ``"int4"`` (torch's CPU int4 kernel) or
        ``"torch"`` (dequantize in torch)."""
        if self.backend not in BACKENDS:
            raise EasyQuantError(f"EasyQuantLinear.backend must be one of {BACKENDS}, got {self.backend!r}")
        short = x.numel() <= KERNEL_MAX_ROWS * self.in_features
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda and kernel.available(x)):
            return "fused" if short else "dequantize"
        cpu_int4 = self._int4_group and self.backend == "auto" and x.device.type == "cpu"
        if cpu_int4 and x.dtype == torch.bfloat16 and x.numel() <= CPU_INT4_MAX_ROWS * self.in_features:
            return "torch" if torch.compiler.is_compiling() else "int4"
        return "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "int4":
            return cpu_kernel.matmul(x, self.int4_weight(), self.bias)
        if path != "torch" and torch.compiler.is_compiling():  # one opaque op for torch.compile
            tensors = [self._parameters[name] for name in QUANTIZED_TENSORS] + [self.zeros, self.col_scales]
            if path == "fused":
                return ops.qmatmul(
                    x, *tensors, self.bias, self.bits, self.group_size, self.out_features, self.zero_shift
                )
            w = ops.dequantize(*tensors, self.bits, self.group_size, self.in_features, x.dtype, self.zero_shift)
        else:  # eager: straight to the kernel, no dispatcher on the decode path's host time
            qw = self.quantized_weight()
            if path == "fused":
                return kernel.qmatmul(x, qw, self.bias, outliers=ops.outlier_mode(qw))
            w = kernel.dequantize(qw, x.dtype) if path == "dequantize" else qw.dequantize(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, outliers={self.outlier_values.numel()}, bias={self.bias is not None}"
            + (", asymmetric=True" if self.asymmetric else "")
            + (f", zero_shift={self.zero_shift}" if self.zero_shift else "")
            + (", col_scale=True" if self.col_scale else "")
        )


def swap_in_quantized(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Replace the ``nn.Linear`` modules named in ``weights`` by :class:`EasyQuantLinear` modules
    holding those packed weights (and the linears' biases)."""
    for name, qw in weights.items():
        model.set_submodule(name, EasyQuantLinear.from_quantized(qw, model.get_submodule(name).bias, name))


class EasyQuantExperts(nn.Module):
    """A transformers experts module (``use_experts_implementation``) whose fused 3-D weights
    are quantized expert by expert: ``gate_up_proj[e]`` and ``down_proj[e]`` are
    :class:`EasyQuantLinear` modules, named so that the checkpoint's
    ``experts.gate_up_proj.{e}.packed`` load into them, and each expert's matmul takes their
    kernel path (the CPU int4 kernel, the Triton kernel). Only the experts some token was
    routed to run. Biases, the activation and the gating (``_apply_gate``, with its clamps)
    are the original module's, so the forward is the original eager one."""

    def __init__(self, original: nn.Module, layers: dict[str, list[EasyQuantLinear]]):
        super().__init__()
        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for key, module in original._modules.items():
            self.add_module(key, module)
        for key, param in original._parameters.items():
            if key not in layers:
                self.register_parameter(key, param)
        for key, experts in layers.items():
            self.add_module(key, nn.ModuleList(experts))
        self.num_experts = len(next(iter(layers.values())))
        self._gate = type(original)._apply_gate
        # The routing arguments' names (gpt-oss calls them router_indices and routing_weights).
        self._routing = list(inspect.signature(type(original).forward).parameters)[2:4]

    def _project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        y = self._modules[name][expert](x)
        bias = self._parameters.get(f"{name}_bias")
        return y if bias is None else y + bias[expert].to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        routing = dict(zip(self._routing, args, strict=False)) | kwargs
        top_k_index, top_k_weights = (routing[k] for k in self._routing)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in hit:
            if e == self.num_experts:  # the padding index of expert parallelism
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            if self.has_gate:
                h = self._gate(self, self._project("gate_up_proj", e, x))
            else:
                h = self.act_fn(self._project("up_proj", e, x))
            y = self._project("down_proj", e, h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
