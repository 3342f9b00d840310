"""End to end on the real model that installs offline (SmolLM2-135M-Instruct, GGUF Q4_1)."""

import pytest
import torch
import transformers

import easyquant  # noqa: F401
from easyquant.assets import news_text, smollm2_gguf
from easyquant.evaluate import perplexity, read_text, token_windows
from easyquant.nn import EasyQuantLinear
from easyquant.pipeline import quantize_model
from easyquant.quantize import QuantConfig


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(tmp_path):
    gguf = smollm2_gguf()
    out = tmp_path / "q"
    summary = quantize_model(gguf, out, QuantConfig(bits=4, group_size=64), workers=2, progress=False)
    assert len(summary.layers) == 30 * 7
    assert 4.2 < summary.bits_per_weight < 4.7
    assert summary.output_bytes < summary.source_bytes / 2

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
