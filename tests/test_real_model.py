"""End to end on the real model that installs offline (SmolLM2-135M-Instruct, GGUF Q4_1)."""

import pytest
import torch
import transformers

import easyquant  # noqa: F401
from easyquant.eval.assets import news_text, smollm2_gguf
from easyquant.eval.evaluate import perplexity, read_text, token_windows
from easyquant.runtime.nn import EasyQuantLinear, tensor_names


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(smollm2_default):
    gguf = smollm2_gguf()
    out, summary = smollm2_default  # the defaults: 4 bits, groups of 64 (two workers)
    assert len(summary.layers) == 30 * 7
    assert 4.2 < summary.bits_per_weight < 4.7
    # The size on disk, from the tensors written: each quantized module's tensors hold
    # exactly the bits per weight the summary reports, under 30% of the same weights in fp16.
    from safetensors.torch import load_file

    (shard,) = out.glob("*.safetensors")
    stored = load_file(shard)
    nbytes = {
        k: t.numel() * t.element_size() for k, t in stored.items() if k.rsplit(".", 1)[-1] in tensor_names(True, True)
    }
    for r in summary.layers:
        layer = sum(v for k, v in nbytes.items() if k.startswith(f"{r['module']}."))
        assert layer * 8 == pytest.approx(r["bits_per_weight"] * r["rows"] * r["cols"], rel=1e-12)
    assert sum(nbytes.values()) < 0.30 * summary.quantized_weights * 2
    assert summary.output_bytes == sum(p.stat().st_size for p in out.glob("*.safetensors"))

    tok = transformers.AutoTokenizer.from_pretrained(out)
    quant = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(isinstance(m, EasyQuantLinear) for m in quant.modules()) == 210
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    windows = token_windows(tok, read_text(news_text()), 256, 4)
    ppl_ref, ppl_q = perplexity(ref.eval(), windows), perplexity(quant, windows)
    assert ppl_ref < ppl_q < 1.5 * ppl_ref, (ppl_ref, ppl_q)

    x = tok("The capital of Australia is", return_tensors="pt")
    y = quant.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(y[0, x.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
