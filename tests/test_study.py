import json

import pytest
import torch

from conftest import heavy_tailed, tiny_model
from easyquant.checkpoint.targets import block_linears
from easyquant.cli import main
from easyquant.core.outliers import sigma_mask
from easyquant.errors import EasyQuantError
from easyquant.eval.compare import resolve
from easyquant.eval.study import outlier_map, outliers_report, range_trace


def test_outlier_map_groups_by_type_and_layer(tmp_path):
    model = tiny_model("llama", tmp_path / "m")
    linears = block_linears(model)
    res = outlier_map(linears, 2.0)
    assert set(res["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(res["by_layer"]) == {0, 1}
    w = dict(linears)["model.layers.1.mlp.up_proj"].weight.data
    assert res["cells"]["1:up_proj"] == pytest.approx(sigma_mask(w, 2.0).float().mean().item())
    ups = [sigma_mask(lin.weight.data, 2.0).sum(1) for n, lin in linears if n.endswith("up_proj")]
    stats = res["rows_by_type"]["up_proj"]
    assert stats["max_row"] == max(int(c.max()) for c in ups)
    assert stats["mean_row"] == pytest.approx(sum(int(c.sum()) for c in ups) / sum(len(c) for c in ups))
    assert stats["max_tile_over_mean"] >= 1.0
    table = outliers_report(linears, 2.0, tmp_path / "out", "tiny")
    assert "| down_proj |" in table
    assert (tmp_path / "out" / "outliers.png").stat().st_size > 1000


def test_range_trace_against_dense_search():
    res = range_trace(heavy_tailed(32, 256, seed=9), bits=4, lr=1e-3, steps=60)
    assert len(res["loss"]) == len(res["relative_range"]) == 60
    assert res["dense_loss"] <= res["search_loss"] * 1.0001
    assert res["search_loss"] <= min(res["loss"]) and res["search_loss"] < res["start_loss"]
    assert res["relative_range"][-1] < 1.0  # Adam shrinks the range from max-abs


def test_method_specs():
    resolve("easyquant:n_sigma=none/group_size=64/solver=paper")
    with pytest.raises(ValueError, match="unknown method"):
        resolve("awq")
    with pytest.raises(ValueError, match="bits must be"):
        resolve("easyquant:bits=12")
    with pytest.raises(EasyQuantError, match="unknown setting 'dual'.*col_scale"):
        resolve("easyquant:dual=false")
    with pytest.raises(EasyQuantError, match="key=value"):
        resolve("easyquant:asymmetric")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "MODEL", "--methods", "rtn,easyquant:dual=false"], "unknown setting 'dual'"),
        (["study", "encoder", "MODEL", "--methods", "awq"], "unknown method 'awq'"),
        (["compare", "MODEL", "--bits", "4,three"], "--bits '4,three'"),
        (["compare", "MODEL", "--bits", "12"], "bits must be"),
    ],
)
def test_bad_methods_and_bits_fail_before_any_model_loads(args, message, tmp_path, capsys):
    """A typo in --methods or --bits is one line naming it, at once (the model path does not exist)."""
    missing = str(tmp_path / "missing.gguf")
    assert main([missing if a == "MODEL" else a for a in args] + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_study_range_cli_on_real_model(tmp_path, capsys):
    assert main(["study", "range", "--steps", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GGUF Q4_1" in out and "| search |" in out
    res = json.loads((tmp_path / "range.json").read_text())
    assert res["dense_loss"] <= res["search_loss"] <= res["loss"][-1]
    assert torch.tensor(res["loss"]).isfinite().all()


def test_encoder_compare_on_a_tiny_bert():
    import transformers

    from easyquant.eval.assets import minilm_dir, news_text
    from easyquant.eval.encoder_eval import encoder_compare, encoder_markdown, sentences
    from easyquant.eval.evaluate import read_text

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    sents = sentences(read_text(news_text()), limit=40)
    assert len(sents) == 40 and all(len(s.split()) >= 5 for s in sents)
    batch = tok(sents, return_tensors="pt", padding=True, truncation=True, max_length=64)
    rows = encoder_compare(model, batch, batch["input_ids"][:8], ["rtn", "easyquant", "gptq"], [3])
    by = {r.method: r for r in rows}
    assert by["easyquant"].cos_mean > by["rtn"].cos_mean
    assert all(0 < r.cos_p1 <= r.cos_mean <= 1 and 0 <= r.nn_agreement <= 1 for r in rows)
    assert "| easyquant | 3 |" in encoder_markdown(rows)
