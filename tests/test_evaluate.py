import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_model
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.core.quantize import QuantConfig, quantize_weight
from easyquant.eval.compare import compare, markdown, write_results
from easyquant.eval.evaluate import Reference, evaluate, token_windows
from easyquant.eval.gptq import gptq_weight
from easyquant.eval.peers import sinkhorn_scales, sinq_quantize


def windows(n=6, length=16, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_model_against_itself(tmp_path):
    model = tiny_model("llama", tmp_path / "m")
    w = windows()
    q = evaluate(model, w, Reference.of(model, w, batch=4))
    assert abs(q.kl_mean) < 1e-3 and q.top1 == 1.0  # KL only as exact as the bf16 reference


def test_kl_and_top1_match_definitions(tmp_path):
    a = tiny_model("llama", tmp_path / "a", seed=0)
    b = tiny_model("llama", tmp_path / "b", seed=1)
    w = windows(n=3)
    q = evaluate(b, w, Reference.of(a, w, batch=2))
    with torch.no_grad():
        pa = torch.log_softmax(a(w).logits[:, :-1].float(), -1)
        pb = torch.log_softmax(b(w).logits[:, :-1].float(), -1)
    kl = (pa.exp() * (pa - pb)).sum(-1)
    nll = -pb.gather(-1, w[:, 1:, None]).mean()
    assert abs(q.kl_mean - kl.mean().item()) < 0.02 * kl.mean().item()  # reference kept in bf16
    assert abs(q.perplexity - nll.exp().item()) < 1e-3 * q.perplexity
    assert q.top1 == pytest.approx((pa.argmax(-1) == pb.argmax(-1)).double().mean().item())


def test_token_windows_drop_the_partial_window():
    class Tok:
        def __call__(self, text, return_tensors, add_special_tokens):
            class R:
                input_ids = torch.arange(len(text.split()))[None]

            return R()

    w = token_windows(Tok(), "a " * 50, 16)
    assert w.shape == (3, 16) and torch.equal(w.flatten(), torch.arange(48))
    assert token_windows(Tok(), "a " * 50, 16, max_windows=2).shape == (2, 16)


def test_gptq_beats_rtn_on_layer_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 96, generator=g) @ torch.randn(96, 96, generator=g)
    w = torch.randn(48, 96, generator=g) * 0.02
    h = x.double().T @ x.double()

    def out_err(wq):
        return (x @ (wq - w).T).square().sum() / (x @ w.T).square().sum()

    for bits, group in [(4, None), (3, 32)]:
        rtn = quantize_weight(
            w, QuantConfig(bits=bits, group_size=group, solver="mse", n_sigma=None, col_scale=False)
        ).dequantize()
        assert out_err(gptq_weight(w, h, bits, group)) < 0.8 * out_err(rtn)


def test_gptq_blocks_see_the_quantized_blocks_before_them():
    """Each block's GPTQ uses the Hessians of its inputs in the model whose earlier blocks are
    already quantized (and its own not yet), with its own mask: the model below alternates full
    and sliding-window attention, so a mask recorded at the first block would be wrong later."""
    import copy

    import transformers

    from conftest import CONFIGS
    from easyquant.eval.gptq import gptq_model

    cfg = copy.deepcopy(CONFIGS["qwen2"])
    cfg.num_hidden_layers, cfg.use_sliding_window, cfg.sliding_window = 3, True, 4
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = copy.deepcopy(original)
    calib = windows(n=6, length=16, seed=1)
    linears = [(n, m) for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]
    gptq_model(model, linears, calib, 3, None)
    for i in range(3):
        probe = copy.deepcopy(model)
        probe.model.layers[i] = copy.deepcopy(original.model.layers[i])
        lins = {n: m for n, m in probe.model.layers[i].named_modules() if isinstance(m, nn.Linear)}
        hs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}

        def add(h: torch.Tensor, x: torch.Tensor) -> None:
            x = x.flatten(0, -2).double()
            h.add_(x.T @ x)

        hooks = [m.register_forward_hook(lambda mod, a, o, h=hs[n]: add(h, a[0])) for n, m in lins.items()]
        with torch.no_grad():
            for x in calib.split(4):
                probe(x)
        for hook in hooks:
            hook.remove()
        for n, m in lins.items():
            got = model.model.layers[i].get_submodule(n).weight
            assert torch.equal(got, gptq_weight(m.weight, hs[n], 3, None)), f"layer {i} {n}"
        assert not torch.equal(model.model.layers[i].mlp.up_proj.weight, original.model.layers[i].mlp.up_proj.weight)


def test_compare_table(tmp_path):
    model = tiny_model("qwen2", tmp_path / "m")
    fp, rows = compare(
        model, windows(), windows(n=4, seed=1), ["rtn", "easyquant", "hqq-g64", "gptq"], [4, 3], gen_tokens=4
    )
    assert [(r.method, r.bits) for r in rows] == [
        (m, b) for b in (4, 3) for m in ("rtn", "easyquant", "hqq-g64", "gptq")
    ]
    assert fp.top1 == 1.0
    for r in rows:
        assert r.kl_mean > 0 and 0 < r.top1 <= 1 and r.bits < r.bits_per_weight < r.bits + 1
    kl = {(r.method, r.bits): r.kl_mean for r in rows}
    assert kl[("easyquant", 3)] < kl[("rtn", 3)]
    write_results(tmp_path / "out", fp, rows, {"date": "test"}, "tiny qwen2")
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][0]["method"] == "rtn"
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    assert "| easyquant | 3 |" in markdown(fp, rows)

    # Generation is timed where a packed runtime exists: the original and the easyquant format.
    speeds = {(r.method, r.bits): r.tokens_per_s for r in rows}
    assert fp.tokens_per_s > 0 and speeds[("easyquant", 4)] > 0 and speeds[("rtn", 3)] > 0
    assert speeds[("hqq-g64", 4)] is None and speeds[("gptq", 3)] is None
    # Size is what the checkpoint holds: `easyquant quantize` with the same settings writes exactly that.
    out = tmp_path / "q"
    quantize_model(tmp_path / "m", out, QuantConfig(bits=4), progress=False)
    stored = sum(t.numel() * t.element_size() for f in out.glob("*.safetensors") for t in load_file(f).values())
    size = next(r.size_mib for r in rows if (r.method, r.bits) == ("easyquant", 4))
    assert abs(size * 2**20 - stored) < 1 and size < fp.size_mib

    # Untimed, each method quantizes the model itself and restores it: the same rows, the model intact.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, untimed = compare(model, windows(), windows(n=4, seed=1), ["rtn", "easyquant", "gptq"], [4, 3], gen_tokens=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    same = {(r.method, r.bits): r.kl_mean for r in untimed}
    assert all(same[key] == kl[key] for key in same)


def test_compare_counts_experts(tmp_path):
    """On a mixture of experts the weight-by-weight methods quantize every expert (the size is
    what `easyquant quantize` writes); GPTQ, linears only, is shown covering less and warned of."""
    model = tiny_model("mixtral", tmp_path / "m")
    with pytest.warns(UserWarning, match=r"gptq: quantized only \d+% of the model's weights"):
        fp, rows = compare(model, windows(), windows(n=4, seed=1), ["easyquant", "gptq"], [4], gen_tokens=0)
    share = {r.method: r.quantized_share for r in rows}
    assert share["easyquant"] > 0.8 > 0.5 > share["gptq"] > 0
    assert "| easyquant | 4 | " in markdown(fp, rows) and f"| {share['easyquant']:.0%} |" in markdown(fp, rows)
    summary = quantize_model(tmp_path / "m", tmp_path / "q", QuantConfig(bits=4), progress=False)
    assert summary.quantized_share == pytest.approx(share["easyquant"])
    stored = sum(
        t.numel() * t.element_size() for f in (tmp_path / "q").glob("*.safetensors") for t in load_file(f).values()
    )
    size = next(r.size_mib for r in rows if r.method == "easyquant")
    assert abs(size * 2**20 - stored) < 1


def test_source_note_names_the_gguf_format(tmp_path):
    import gguf
    import numpy as np

    from easyquant.checkpoint.source import source_note
    from easyquant.eval.assets import smollm2_gguf

    assert source_note(smollm2_gguf()) == " (weights from GGUF Q4_1: quantized once already)"
    for kind, expect in [("MOSTLY_Q4_K_M", " (weights from GGUF Q4_K_M: quantized once already)"),
                         ("ALL_F32", " (weights from GGUF ALL_F32)")]:  # fmt: skip
        path = tmp_path / f"{kind}.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_file_type(gguf.LlamaFileType[kind])
        w.add_tensor("x", np.zeros((4, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert source_note(path) == expect
    assert source_note(tmp_path) == ""


def test_sinq_peer_evens_out_rows_and_columns():
    """The SINQ peer row: Sinkhorn steps lower a tile's imbalance, and on a weight whose columns
    differ widely in scale the dual scaling beats plain asymmetric min-max per group."""
    g = torch.Generator().manual_seed(0)
    cols = torch.logspace(-2, 0, 128)[torch.randperm(128, generator=g)]
    w = torch.randn(64, 128, generator=g) * cols
    tiles = w.reshape(64, 2, 64).transpose(0, 1)
    col, row = sinkhorn_scales(tiles)

    def imbalance(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.std(2), t.std(1)], dim=1).amax(1) / torch.cat([t.std(2), t.std(1)], dim=1).amin(1)

    assert torch.all(imbalance(tiles / col[:, None, :] / row[:, :, None]) < imbalance(tiles) / 2)
    deq, bpw = sinq_quantize(w, 4, 64)
    assert bpw == 4 + 32 / 64 + 16 / 64
    minmax = quantize_weight(
        w, QuantConfig(group_size=64, n_sigma=None, solver="rtn", asymmetric=True, col_scale=False)
    )
    assert (deq - w).norm() < (minmax.dequantize() - w).norm()
    # a group size that does not divide the row (SmolLM2's 576 columns in groups of 128): a shorter last tile
    deq, bpw = sinq_quantize(w, 4, 48)
    assert bpw == pytest.approx(4 + 32 * 3 / 128 + 16 / 64)
    assert (deq - w).norm() < (minmax.dequantize() - w).norm() * 1.2 and deq[:, 96:].abs().sum() > 0
