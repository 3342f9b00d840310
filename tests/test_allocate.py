"""Bits where they matter (``--target-bpw``): the knapsack, the plan, and checkpoints whose
modules each carry their own bits and group size (format 4), loaded and served."""

import itertools
import json
from dataclasses import replace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from conftest import claim_format, heavy_tailed, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.format import FORMAT_VERSION
from easyquant.checkpoint.pipeline import Options, quantize_model
from easyquant.cli import main
from easyquant.core.allocate import Choice, allocate, menu, plan, score
from easyquant.core.quantize import rtn_errors
from easyquant.core.qweight import storage_bytes

choice = st.builds(Choice, bits=st.integers(1, 40).map(float), error=st.floats(0, 10))
layers = st.lists(st.lists(choice, min_size=1, max_size=4), min_size=1, max_size=4)


def _cost(layers: list[list[Choice]], pick: list[int]) -> tuple[float, float]:
    return sum(c[i].bits for c, i in zip(layers, pick, strict=True)), sum(
        c[i].error for c, i in zip(layers, pick, strict=True)
    )


@settings(max_examples=200, deadline=None)
@given(layers=layers, slack=st.floats(0, 1))
def test_allocation_stays_in_budget_and_near_the_best(layers, slack):
    cheapest = sum(min(c.bits for c in row) for row in layers)
    dearest = sum(max(c.bits for c in row) for row in layers)
    budget = cheapest + slack * (dearest - cheapest)
    pick = allocate(layers, budget)
    bits, error = _cost(layers, pick)
    assert bits <= budget
    feasible = [_cost(layers, p) for p in itertools.product(*(range(len(r)) for r in layers))]
    best = min(e for b, e in feasible if b <= budget)
    # Greedy on the convex hulls: within one layer's largest single improvement of the optimum.
    largest = max(max(c.error for c in row) - min(c.error for c in row) for row in layers)
    assert best <= error <= best + largest + 1e-9
    if budget >= dearest:  # room for everything: each layer at its least error
        assert error == pytest.approx(sum(min(c.error for c in row) for row in layers))


def test_allocation_refuses_a_budget_below_the_cheapest():
    with pytest.raises(EasyQuantError, match="below the cheapest"):
        allocate([[Choice(10, 1.0), Choice(20, 0.5)]], 9)


def test_menu_spans_bits_groups_and_outliers():
    settings_ = {(c.bits, c.group_size, c.n_sigma) for c in menu(QuantConfig())}
    assert settings_ == set(itertools.product((3, 4, 5), (64, 128), (4.0, None)))
    assert {(c.bits, c.group_size) for c in menu(QuantConfig(bits=2, group_size=None, n_sigma=None))} == {
        (2, None),
        (3, None),
    }


@pytest.mark.parametrize(
    "base",
    [
        QuantConfig(),
        QuantConfig(bits=3, group_size=None, n_sigma=3.0, outlier_scope="row"),
        QuantConfig(bits=3, group_size=None, asymmetric=True, fractional_zero=True),
    ],
)
def test_scoring_the_menu_at_once_is_scoring_each_setting(base):
    """The menu scored in one call (settings alike but for their bits sharing their mask, column
    scales and rows' ends) gives each setting the score a call for it alone gives; ``score``'s
    row is those errors, without column scales, and the solved weights' sizes."""
    w = heavy_tailed(48, 200, seed=5)
    options = menu(base)
    together = rtn_errors(w, options)
    assert together == [rtn_errors(w, [c])[0] for c in options]
    (row,) = score([("w", lambda: w)], options, progress=False)[0].values()
    plain = rtn_errors(w, [replace(c, col_scale=False) for c in options])
    assert row == [Choice(8 * quantize_weight(w, c).nbytes, e * w.numel()) for c, (e, _) in
                   zip(options, plain, strict=True)]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 150),
    bits=st.integers(2, 6),
    group=st.sampled_from([None, 8, 32, 64]),
    n_sigma=st.sampled_from([None, 3.0, 4.0]),
    asymmetric=st.booleans(),
    col_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_score_is_the_rtn_error_and_the_stored_size(rows, cols, bits, group, n_sigma, asymmetric, col_scale, seed):
    """The budget's score of a setting, computed without packing anything: its error is the
    relative squared error of the weight quantized at that setting by round-to-nearest (to the
    fp16 rounding of the stored outliers and column scales), its size what the solved weight
    stores."""
    w = heavy_tailed(rows, cols, seed=seed)
    config = QuantConfig(bits=bits, group_size=group, n_sigma=n_sigma, asymmetric=asymmetric, col_scale=col_scale)
    ((err, outliers),) = rtn_errors(w, [config])
    rtn = quantize_weight(w, replace(config, solver="rtn"))
    x = w.float()
    want = ((rtn.dequantize(torch.float32) - x).square().sum() / x.square().sum()).item()
    assert err == pytest.approx(want, rel=2e-3, abs=1e-9)  # the stored outliers are rounded to fp16
    solved = quantize_weight(w, config)
    assert outliers == solved.outlier_count == rtn.outlier_count
    assert storage_bytes(w.shape, bits, group or cols, outliers, asymmetric, col_scale) == solved.nbytes


def test_plan_gives_the_harder_layer_more_bits():
    # Two layers of equal size: one Gaussian, one heavy-tailed (larger error at every setting).
    easy, hard = torch.randn(64, 128) * 0.02, heavy_tailed(64, 128, seed=1, df=2.5)
    weights = [("easy", lambda: easy), ("hard", lambda: hard)]
    base = QuantConfig(group_size=64, col_scale=False)
    chosen = plan(weights, base, 5.0, progress=False)
    got = sum(quantize_weight(w, chosen[name]).bits_per_weight for name, w in (("easy", easy), ("hard", hard))) / 2
    assert got <= 5.0
    assert chosen["hard"].bits > chosen["easy"].bits
    # Weights that share a name are one unit: one setting, their errors and bits summed.
    shared = plan([("both", lambda: easy), ("both", lambda: hard)], base, 4.3, progress=False)
    assert list(shared) == ["both"]
    with pytest.raises(EasyQuantError, match="below the least these settings reach"):
        plan(weights, base, 3.0, progress=False)


# The default's groups, and the 3-bit recipe that beat GPTQ at its own bits on MiniLM (RESULTS.md):
# one scale and fractional zero point per row, the budget choosing bits and outliers per layer.
BUDGETS = [
    (["--group-size", "32"], QuantConfig(group_size=32), 4.3, "-bit g"),
    (
        ["--bits", "3", "--per-channel", "--asymmetric", "--fractional-zero"],
        QuantConfig(bits=3, group_size=None, asymmetric=True, fractional_zero=True),
        3.1,
        "-bit per channel",
    ),
]


def _quantize_on_budget(src, out, flags: list[str], base: QuantConfig, target: float) -> dict:
    """Quantize ``src`` under ``target`` bits per weight and check that the checkpoint loads as
    the plan it reports: each module its own setting from ``base``'s menu. Its quantization_config."""
    main(["quantize", str(src), str(out), "--target-bpw", str(target), *flags])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION and qc["target_bpw"] == target
    summary = (out / "easyquant_summary.md").read_text()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    bits = n = 0
    for name, lin in ref.named_modules():
        if name not in qc["modules"]:
            continue
        m = qc["modules"][name]
        # The plan's setting: its bits and groups, outliers kept or not as the stored count says.
        made = (quantize_weight(lin.weight.data, c) for c in menu(base) if c.bits == m["bits"])
        qw = next(q for q in made if (q.group_size, q.outlier_count) == (m["group_size"], m["outliers"]))
        bits, n = bits + qw.bits_per_weight * lin.weight.numel(), n + lin.weight.numel()
        lin.weight.data = qw.dequantize()
        assert f"| {name} | {lin.out_features}x{lin.in_features} | {m['bits']} | {m['group_size']} |" in summary
    assert bits / n <= target
    stored = {k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    assert {f"{name}.zeros" in stored for name in qc["modules"]} == {base.asymmetric}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    return qc


@pytest.mark.parametrize(("flags", "base", "target", "shown"), BUDGETS)
def test_target_bpw_checkpoint_loads_with_each_modules_settings(tmp_path, capsys, flags, base, target, shown):
    src = tmp_path / "src"
    tiny_model("llama", src)
    qc = _quantize_on_budget(src, tmp_path / "out", flags, base, target)
    printed = capsys.readouterr().out
    assert f"settings chosen for {target} bits/weight:" in printed and shown in printed
    assert len({(m["bits"], m["group_size"]) for m in qc["modules"].values()}) > 1  # a mix, not one setting


def test_target_bpw_refuses_damaged_module_settings(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    main(["quantize", str(src), str(out), "--target-bpw", "4.3", "--group-size", "32"])
    # Format 4 is what per-module settings need; a damaged entry is refused by name.
    claim_format(out, 3)
    with pytest.raises(EasyQuantError, match="need format_version 4"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    claim_format(out, 4)
    config = json.loads((out / "config.json").read_text())
    first = next(iter(config["quantization_config"]["modules"]))
    for bad in ({"bits": 12}, {"group_size": 0}, {"bits": None}):
        damaged = json.loads(json.dumps(config))
        damaged["quantization_config"]["modules"][first] |= bad
        (out / "config.json").write_text(json.dumps(damaged))
        with pytest.raises(EasyQuantError, match="modules must map module names"):
            transformers.AutoModelForCausalLM.from_pretrained(out)
    damaged = json.loads(json.dumps(config))
    del damaged["quantization_config"]["modules"][first]["group_size"]
    (out / "config.json").write_text(json.dumps(damaged))
    with pytest.raises(EasyQuantError, match="modules must map module names"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_target_bpw_refuses_what_it_cannot_reach(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen2", src)
    with pytest.raises(EasyQuantError, match="target of 1 bits per weight is below the least"):
        quantize_model(src, tmp_path / "low", QuantConfig(group_size=32), Options(target_bpw=1.0), progress=False)


def test_target_bpw_gives_each_experts_module_one_setting(tmp_path):
    from easyquant.checkpoint.source import open_source
    from easyquant.checkpoint.targets import find_targets
    from easyquant.runtime.nn import EasyQuantExperts

    src, out = tmp_path / "moe", tmp_path / "q"
    tiny_model("mixtral", src)
    base = QuantConfig(group_size=32)
    summary = quantize_model(src, out, base, Options(target_bpw=4.4), progress=False)
    assert summary.bits_per_weight <= 4.4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION
    experts = {m: info for m, info in qc["modules"].items() if isinstance(info["outliers"], dict)}
    assert len(experts) == 2 and len({(m["bits"], m["group_size"]) for m in qc["modules"].values()}) > 1
    rows = {r["module"]: r for r in summary.layers}
    targets = find_targets(open_source(src, tmp_path / "staging"), (), ()).targets
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    modules = dict(loaded.named_modules())
    for t in (t for t in targets if t.expert is not None):
        module, param, e = t.expert
        info = experts[module]
        row = rows[t.module]
        assert (row["bits"], row["group_size"]) == (info["bits"], min(info["group_size"], row["cols"]))
        # The loaded expert holds what the module's setting makes of that expert's matrix.
        layer = getattr(modules[module], param)[e]
        assert isinstance(modules[module], EasyQuantExperts) and layer.bits == info["bits"]
        made = (quantize_weight(t.source.load(), c) for c in menu(base) if c.bits == info["bits"])
        stored = (row["group_size"], info["outliers"][param][e])
        qw = next(q for q in made if (q.group_size, q.outlier_count) == stored)
        torch.testing.assert_close(layer.quantized_weight().dequantize(torch.float32), qw.dequantize(torch.float32))


def test_compare_row_under_a_bits_budget(tmp_path):
    from easyquant.eval.compare import compare, resolve

    with pytest.raises(ValueError, match="bits must be an integer"):
        resolve("easyquant:target_bpw=4.3/bits=12")
    model = tiny_model("qwen2", tmp_path / "m")
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    targets = ["easyquant:group_size=32/target_bpw=4.3", "easyquant:group_size=32/target_bpw=4.6"]
    _, rows = compare(model, x, x, [*targets, "easyquant:group_size=32"], [4], 0)
    budget, wider, fixed = rows
    assert budget.bits_per_weight <= 4.3 < fixed.bits_per_weight
    assert budget.kl_mean > 0 and budget.quantized_share == fixed.quantized_share
    assert 4.3 < wider.bits_per_weight <= 4.6 and wider.kl_mean < budget.kl_mean
    # The second target reused the first one's scoring: the same rows as a run of its own.
    _, (alone,) = compare(model, x, x, targets[1:], [4], 0)
    assert (alone.bits_per_weight, alone.kl_mean, alone.rel_error) == (
        wider.bits_per_weight,
        wider.kl_mean,
        wider.rel_error,
    )
