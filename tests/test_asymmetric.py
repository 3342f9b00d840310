"""The asymmetric option: an fp16 zero per row or group beside the scale (format 2).

The math (codes, the range solver, outliers as residuals), then the whole path: checkpoint,
``from_pretrained``, every runtime, format-1 checkpoints, and damaged zeros."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import claim_format, heavy_tailed, loads_like_memory, module_matches, per_weight, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.checkpoint.pipeline import FORMAT_VERSION, quantize_model
from easyquant.core.grid import Grid, min_max, zero_point
from easyquant.core.groups import to_groups
from easyquant.core.objective import Objective
from easyquant.core.solvers import AffineSearch, _fit_scale


@pytest.mark.filterwarnings("ignore:.*outliers")
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    group=st.sampled_from([None, 8, 16, 32]),
    solver=st.sampled_from(["rtn", "search"]),
    n_sigma=st.sampled_from([None, 2.0, 3.0]),
    shift=st.sampled_from([0.0, 0.03]),
    seed=st.integers(0, 2**16),
)
def test_codes_zero_points_and_exact_outliers(bits, rows, cols, group, solver, n_sigma, shift, seed):
    """The dense part is exactly ``scale * (u - zero)`` with unsigned codes and integer zero
    points, so 0 is on the grid; outliers hold the zero point's code and come back exactly, to
    fp16; an unclipped weight is within half a step; min-max (``rtn``) clips by under a step."""
    w = heavy_tailed(rows, cols, seed=seed) + shift  # off-centre rows are what the zero point is for
    config = QuantConfig(
        bits=bits,
        group_size=group,
        n_sigma=n_sigma,
        solver=solver,
        asymmetric=True,
        max_outlier_fraction=1.0,
        col_scale=False,
    )
    q = quantize_weight(w, config)
    q.check("w")
    assert q.asymmetric and q.zeros.shape == q.scales.shape and q.zeros.dtype == torch.uint8
    assert bool((q.scales > 0).all()) and int(q.zeros.max()) <= Grid(bits).top
    gs = q.group_size
    s, z, u = per_weight(q.scales, gs, cols), per_weight(q.zeros, gs, cols), q.codes().float()
    deq = q.dequantize(torch.float32)
    outlier = torch.zeros_like(w, dtype=torch.bool)
    outlier[q.outlier_rows(), q.outlier_cols.long()] = True
    assert torch.equal(deq[~outlier], (s * (u - z))[~outlier])
    assert torch.equal(deq[outlier], w[outlier].half().float()) and torch.equal(u[outlier], z[outlier])
    unclipped = ~outlier & (u > 0) & (u < Grid(bits).top)
    assert torch.all((deq - w).abs()[unclipped] <= s[unclipped] / 2 * (1 + 1e-3) + 1e-7)
    if solver == "rtn":  # the range spans every kept weight, shifted by at most half a step to put 0 on the grid
        assert torch.all((deq - w).abs()[~outlier] <= s[~outlier] * 1.01 + 1e-7)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16), p=st.sampled_from([2.0, 3.0]))
def test_affine_search_beats_min_max_and_a_dense_scan(bits, seed, p):
    w = to_groups(heavy_tailed(16, 128, seed=seed) + 0.01, 32)
    c = torch.ones_like(w)
    grid, obj = Grid(bits), Objective(p=p)
    s, z = AffineSearch(obj).solve(w, c, grid)
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= grid.top
    ours = obj.affine_loss(w, c, s, z, grid)
    s0, z0 = AffineSearch(coarse=0).solve(w, c, grid)
    assert torch.all(ours <= obj.affine_loss(w, c, s0, z0, grid))
    # within 0.1%, over all rows, of the best of a dense scan of 200 centred shrinks
    lo = w.amin(1).clamp_max(0)
    mid = lo + s0 * grid.top / 2
    scan = []
    for t in torch.linspace(0.3, 1, 200):
        st_ = (s0 * t).half().float()
        scan.append(obj.affine_loss(w, c, st_, zero_point(mid - st_ * grid.top / 2, st_, grid), grid))
    assert ours.sum() <= torch.stack(scan).amin(0).sum() * (1 + 1e-3)


def test_scale_fit_is_the_exact_least_squares_scale():
    """With the levels fixed, the p = 2 step is the least-squares scale through them."""
    w = to_groups(heavy_tailed(4, 64, seed=3) + 0.02, 64)
    grid = Grid(3)
    s0, z0 = min_max(w, torch.ones_like(w, dtype=torch.bool), grid)
    q = grid.affine_codes(w, s0[:, None], z0[:, None]) - z0[:, None]
    s = _fit_scale(w, torch.ones_like(w), s0, q, 2.0)
    for r in range(w.shape[0]):
        fit = torch.linalg.lstsq(q[r].double()[:, None], w[r].double()[:, None]).solution.item()
        assert abs(s[r].item() - fit) <= 1e-5 * abs(fit)


def test_asymmetric_beats_symmetric_on_off_centre_rows():
    w = heavy_tailed(64, 256, seed=5) + 0.02
    for bits in (3, 4):
        cfg = QuantConfig(bits=bits, group_size=64, n_sigma=None, col_scale=False)
        sym = quantize_weight(w, cfg).dequantize()
        asym = quantize_weight(w, replace(cfg, asymmetric=True)).dequantize()
        assert (asym - w).norm() < 0.9 * (sym - w).norm()


def test_settings_it_refuses():
    with pytest.raises(EasyQuantError, match="asymmetric ranges are solved by search or rtn"):
        QuantConfig(asymmetric=True, solver="paper")
    with pytest.raises(EasyQuantError, match="asymmetric must be true or false"):
        QuantConfig(asymmetric="yes")


def test_deterministic():
    w = heavy_tailed(48, 160, seed=9)
    cfg = QuantConfig(bits=3, group_size=32, asymmetric=True)
    a, b = quantize_weight(w, cfg), quantize_weight(w.clone(), cfg)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_runtimes_agree(dtype):
    """The torch path, the CPU int4 kernel (bf16) and the module built from the weight all give
    the dequantized weight's product."""
    qw = quantize_weight(heavy_tailed(64, 256, seed=2) + 0.01, QuantConfig(group_size=64, n_sigma=2.5, asymmetric=True))
    lin = module_matches(qw, dtype)
    assert "asymmetric=True" in repr(lin)


def test_checkpoint_loads_with_the_in_memory_logits(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, n_sigma=2.5, asymmetric=True, col_scale=False)
    qc, shard, tensors, summary = loads_like_memory(tmp_path, cfg)
    out = shard.parent
    assert qc["asymmetric"] is True and qc["format_version"] == FORMAT_VERSION
    assert sum(k.endswith(".zeros") for k in tensors) == len(summary.layers)

    # damaged zero points are refused by name; a format-1 config may not claim asymmetric weights
    name = next(k for k in tensors if k.endswith(".zeros"))
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][0, 0] = 16
    save_file(bad, shard, metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=rf"{name} holds zero points outside 0..15"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    claim_format(out, 1)
    with pytest.raises(EasyQuantError, match="these settings need format_version 2"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_missing_zeros_are_refused_and_format_1_checkpoints_still_load(tmp_path):
    src, out, sym = tmp_path / "src", tmp_path / "out", tmp_path / "sym"
    tiny_model("qwen2", src)
    quantize_model(src, out, QuantConfig(group_size=32, asymmetric=True, col_scale=False), progress=False)
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith(".zeros"))
    save_file({k: v for k, v in tensors.items() if k != name}, shard, metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match=rf"no tensor {name}"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    # A symmetric checkpoint as easyquant 1 wrote it (format 1, no asymmetric key) loads as before.
    quantize_model(src, sym, QuantConfig(group_size=32, col_scale=False), progress=False)
    before = transformers.AutoModelForCausalLM.from_pretrained(sym).eval()
    claim_format(sym, 1)
    config = json.loads((sym / "config.json").read_text())
    del config["quantization_config"]["asymmetric"], config["quantization_config"]["col_scale"]
    (sym / "config.json").write_text(json.dumps(config))
    old = transformers.AutoModelForCausalLM.from_pretrained(sym).eval()
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(old(x).logits, before(x).logits)
