"""Outliers chosen by what they save (``outlier_rule="savings"``): the budget, the envelope, and
a lower loss than the sigma rule's at the same count."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import heavy_tailed, loads_like_memory, tiny_model
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.cli import main
from easyquant.core.grid import Grid
from easyquant.core.quantize import _loss, _solve
from easyquant.core.savings import envelope_gains, savings_mask


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-1, 10), min_size=4, max_size=4), min_size=1, max_size=5))
def test_envelope_gains_are_a_concave_cover_of_the_savings(curves):
    savings = torch.tensor([[0.0, *c] for c in curves], dtype=torch.float64)
    gains = envelope_gains(savings)
    assert gains.shape == (len(curves), 4) and bool((gains >= 0).all())
    assert bool((gains.diff(dim=1) <= 1e-12).all())  # non-increasing: a group's weights go in order
    reach = torch.cat([savings[:, :1], gains.cumsum(dim=1)], dim=1)
    assert bool((reach >= savings - 1e-9).all())  # never below a point it could reach
    best = savings.max(dim=1).values
    torch.testing.assert_close(reach.max(dim=1).values, best)  # and the best point is on it


def test_savings_mask_spends_the_budget_where_a_weight_stretches_a_range():
    # Row 0: one weight of 3 among values of about 1 (its removal shrinks the range threefold);
    # row 1: larger weights, every one on the 3-bit grid of step 1 (nothing to save), where a rule
    # by size would take the -4.
    w = torch.tensor([[1.0, -0.9, 0.8, 3.0, 0.7, -1.0, 0.6, 0.9], [-4.0, 3.0, 2.0, -2.0, 1.0, -3.0, 0.0, -1.0]])
    c = torch.ones_like(w)
    config = QuantConfig(bits=3, group_size=None, col_scale=False)

    def group_loss(wg, cg):
        return _loss(wg, cg, _solve(wg, cg, config, Grid(3), 64), config, Grid(3))

    mask = savings_mask(w, c, torch.tensor(1), 8, 2, group_loss)
    assert mask.sum() == 1 and bool(mask[0, 3])
    per_row = savings_mask(w, c, torch.tensor([0, 2]), 8, 2, group_loss)
    assert not per_row.any()  # row 0 may take none, and row 1 has nothing to save
    none = savings_mask(w, torch.zeros_like(w), torch.tensor(3), 8, 2, group_loss)
    assert not none.any()  # weights that are not quantized save nothing


def _cubic_loss(q, w: torch.Tensor) -> float:
    """The search solver's objective (p = 3, unit importances) over the whole matrix."""
    return (q.dequantize(torch.float64) - w.double()).abs().pow(3).sum().item()


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    bits=st.sampled_from([3, 4]),
    group_size=st.sampled_from([None, 16, 48]),
    scope=st.sampled_from(["tensor", "row"]),
    n_sigma=st.sampled_from([2.5, 3.5]),
    asymmetric=st.booleans(),
)
def test_savings_never_loses_to_sigma_at_the_same_count(seed, bits, group_size, scope, n_sigma, asymmetric):
    w = heavy_tailed(24, 96, seed=seed)
    base = dict(
        bits=bits, group_size=group_size, outlier_scope=scope, n_sigma=n_sigma, col_scale=False, asymmetric=asymmetric
    )
    sigma = quantize_weight(w, QuantConfig(**base))
    saved = quantize_weight(w, QuantConfig(**base, outlier_rule="savings"))
    counts = [q.row_pointers().diff() for q in (sigma, saved)]
    if scope == "tensor":
        assert counts[1].sum() <= counts[0].sum()
    else:
        assert bool((counts[1] <= counts[0]).all())
    assert _cubic_loss(saved, w) <= _cubic_loss(sigma, w) * (1 + 1e-6)
    assert torch.equal(saved.dequantize(), quantize_weight(w, QuantConfig(**base, outlier_rule="savings")).dequantize())


@pytest.mark.parametrize("group_size", [None, 32])
def test_savings_lower_the_loss_of_heavy_tailed_weights(group_size):
    w = heavy_tailed(128, 256, seed=3, df=3.0)
    base = dict(bits=3, group_size=group_size, n_sigma=3.0, col_scale=False)
    sigma, saved = (quantize_weight(w, QuantConfig(**base, outlier_rule=r)) for r in ("sigma", "savings"))
    assert saved.outlier_values.numel() == sigma.outlier_values.numel()
    assert not torch.equal(saved.outlier_cols, sigma.outlier_cols)
    assert _cubic_loss(saved, w) < 0.99 * _cubic_loss(sigma, w)


def test_savings_with_column_scales_round_trip_a_checkpoint(tmp_path):
    config = QuantConfig(outlier_rule="savings", n_sigma=2.5)
    qc, _, _, summary = loads_like_memory(tmp_path, config)
    assert qc["outlier_rule"] == "savings" and summary.outlier_fraction > 0


def test_outlier_rule_is_checked_and_set_from_the_cli(tmp_path, capsys):
    with pytest.raises(EasyQuantError, match="outlier_rule must be one of sigma, savings"):
        QuantConfig(outlier_rule="largest")
    tiny_model("qwen2", tmp_path / "src")
    main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--outlier-rule", "savings", "--n-sigma", "3"])
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["outlier_rule"] == "savings"
