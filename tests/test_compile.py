"""torch.compile sees one opaque op per quantized linear: EasyQuantLinear compiles with
fullgraph=True on both paths (the Triton kernel, here under TRITON_INTERPRET=1, and torch's
dequantize), and the custom ops pass torch's own checks of schema and fake tensors."""

from __future__ import annotations

import pytest
import torch
import transformers

import easyquant.runtime.ops  # noqa: F401  (registers torch.ops.easyquant)
from conftest import tiny_model
from easyquant import QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.runtime.kernel import available
from easyquant.runtime.nn import KERNEL_MAX_ROWS, EasyQuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if available(torch.zeros(1, device=DEVICE)) else [])


@pytest.fixture(params=[(False, False), (True, False), (False, True)], ids=["symmetric", "asymmetric", "col-scale"])
def layer(request):
    asymmetric, col_scale = request.param
    config = QuantConfig(group_size=32, n_sigma=2.5, asymmetric=asymmetric, col_scale=col_scale)
    qw = quantize_weight(torch.randn(48, 96) * 0.05, config).to(DEVICE)
    assert qw.outlier_count > 0
    yield EasyQuantLinear.from_quantized(qw, torch.randn(48, device=DEVICE))
    EasyQuantLinear.backend = "auto"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS + 3])  # decode, prefill, past the fused kernel
def test_linear_compiles_whole(layer, backend, rows):
    EasyQuantLinear.backend = backend
    x = torch.randn(rows, 96, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fails on any graph break
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_custom_ops_pass_opcheck(layer):
    tensors = (layer.packed, layer.scales, layer.outlier_rowptr, layer.outlier_cols, layer.outlier_values, layer.zeros,
               layer.col_scales)  # fmt: skip
    x = torch.randn(3, 96, device=DEVICE)
    torch.library.opcheck(torch.ops.easyquant.qmatmul.default, (x, *tensors, layer.bias, 4, 32, 48))
    torch.library.opcheck(torch.ops.easyquant.dequantize.default, (*tensors, 4, 32, 96, torch.float32))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_model_compiles_through_the_kernel(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("qwen2", src)  # biases on q, k and v: the kernel adds them
    quantize_model(src, out, QuantConfig(bits=4, group_size=32), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).to(DEVICE).eval()
    EasyQuantLinear.backend = "triton"
    try:
        x = torch.randint(0, 128, (1, 6), device=DEVICE)
        with torch.no_grad():
            eager = model(x).logits
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager")(x).logits
    finally:
        EasyQuantLinear.backend = "auto"
    torch.testing.assert_close(compiled, eager)
