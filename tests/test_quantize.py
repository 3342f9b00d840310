from dataclasses import fields, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import heavy_tailed, per_weight
from easyquant import EasyQuantError, QuantConfig, quantize_weight
from easyquant.core import groups
from easyquant.core.grid import Grid
from easyquant.core.groups import from_groups, to_groups
from easyquant.core.outliers import sigma_mask
from easyquant.core.packing import packed_cols
from easyquant.core.qweight import QuantizedWeight, csr_from_mask, index_dtype, rowptr_layout


def paper_shape(**kw: object) -> QuantConfig:
    """The quantizer's math is checked on the paper's shape (per channel, 3 sigma, no column
    scales) unless a test names another; column scales have tests of their own."""
    return QuantConfig(**{"group_size": None, "n_sigma": 3.0, "col_scale": False} | kw)


def expanded_scales(q):
    return per_weight(q.scales, q.group_size, q.shape[1])


@pytest.mark.filterwarnings("ignore:.*outliers")
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    group=st.sampled_from([None, 8, 16, 32]),
    solver=st.sampled_from(["rtn", "mse", "search", "paper"]),
    seed=st.integers(0, 2**16),
)
def test_normal_weights_within_half_step_and_outliers_exact(bits, rows, cols, group, solver, seed):
    w = heavy_tailed(rows, cols, seed=seed)
    q = quantize_weight(w, paper_shape(bits=bits, group_size=group, solver=solver))
    grid, codes = Grid(bits), q.codes().float()
    s = expanded_scales(q)
    deq = q.dequantize()
    outlier = torch.zeros_like(w, dtype=torch.bool)
    r = torch.repeat_interleave(torch.arange(rows), torch.diff(q.row_pointers()))
    outlier[r, q.outlier_cols.long()] = True
    # Outliers come back exactly, to fp16.
    assert torch.equal(deq[outlier], w[outlier].half().float())
    # dequantize() is exactly scale * code elsewhere.
    assert torch.equal(deq[~outlier], (s * codes)[~outlier])
    # A normal weight that is not clipped is within half a step of its reconstruction.
    unclipped = ~outlier & (codes > grid.qmin) & (codes < grid.qmax)
    err = (deq - w).abs()
    assert torch.all(err[unclipped] <= s.abs()[unclipped] / 2 * (1 + 1e-6) + 1e-12)
    assert torch.all(codes[outlier] == 0)


def test_rtn_clips_nothing(weight):
    q = quantize_weight(weight, paper_shape(solver="rtn", n_sigma=None))
    err = (q.dequantize() - weight).abs()
    # fp16 rounding of the scale may shave a hair off the range; never more.
    assert torch.all(err <= expanded_scales(q).abs() / 2 * 1.002)


def test_largest_weight_uses_the_long_side_of_the_grid(weight):
    q = quantize_weight(weight, paper_shape(solver="rtn", n_sigma=None))
    peak = weight.abs().argmax(dim=1)
    codes = q.codes()
    peak_code = codes.gather(1, peak[:, None]).squeeze(1)
    assert torch.all(peak_code < 0)
    # No range is wasted: the peak sits on qmin unless the other side already reaches qmax.
    assert torch.all((peak_code == Grid(4).qmin) | (codes.amax(dim=1) == Grid(4).qmax))
    assert (peak_code == Grid(4).qmin).float().mean() > 0.5


def test_sigma_rule_by_hand():
    # Nine zeros and a ten: mean 1, population std sqrt((9 * 1 + 81) / 10) = 3, so the ten is
    # exactly 3 sigma out (the rule's >= takes it); the zeros are 1/3 sigma out.
    w = torch.tensor([[0.0] * 9 + [10.0]])
    assert sigma_mask(w, 3.0).tolist() == [[False] * 9 + [True]]
    assert not sigma_mask(w, 3.001).any()
    assert sigma_mask(w, 1 / 3).all()  # |0 - 1| = 1 = 1/3 * 3: on the threshold, taken
    # Per row: each row its own mean and std; the second row is the first one scaled.
    two = torch.tensor([[0.0] * 9 + [10.0], [0.0] * 9 + [100.0]])
    assert sigma_mask(two, 3.0, "row").tolist() == [[False] * 9 + [True]] * 2
    # Per tensor, the first row's ten sits near the mean of both rows: not an outlier.
    assert sigma_mask(two, 3.0).tolist() == [[False] * 10, [False] * 9 + [True]]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(2, 40),
    n_sigma=st.floats(0.25, 4),
    scope=st.sampled_from(["tensor", "row"]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_sigma_rule_is_the_fp64_definition(rows, cols, n_sigma, scope, seed, dtype):
    """The blocked fp32 test against bounds is the rule as written, in fp64 on the whole matrix,
    row blocks of a few rows included."""
    w = (heavy_tailed(rows, cols, seed=seed) + (seed % 5 - 2) * 0.01).to(dtype)
    x = w.double()
    dims = {} if scope == "tensor" else {"dim": 1, "keepdim": True}
    mean, std = x.mean(**dims), x.std(correction=0, **dims)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(groups.BLOCK_ELEMENTS, "cpu", 64)
        assert torch.equal(sigma_mask(w, n_sigma, scope), ((x - mean).abs() >= n_sigma * std) & (std > 0))


def test_row_blocks_change_nothing(monkeypatch):
    """A matrix quantized in row blocks of a few rows is the matrix quantized whole."""
    w = heavy_tailed(50, 96, seed=4)
    for config in (paper_shape(), QuantConfig(bits=3, col_scale=False, outlier_rule="savings", asymmetric=True)):
        whole = quantize_weight(w, config)
        monkeypatch.setitem(groups.BLOCK_ELEMENTS, "cpu", 7 * 96)
        blocked = quantize_weight(w, config)
        monkeypatch.undo()
        for f in fields(whole):
            a, b = getattr(whole, f.name), getattr(blocked, f.name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


def test_sigma_rule_std_zero_guard():
    # A constant population has std 0: |w - mean| >= n * 0 holds everywhere, yet nothing is an outlier.
    assert not sigma_mask(torch.full((3, 4), 0.5), 3.0).any()
    rows = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 8.0]])
    assert sigma_mask(rows, 1.0, "row").tolist() == [[False] * 4, [False, False, False, True]]


def test_outlier_fraction_and_count_are_reported(weight):
    q = quantize_weight(weight, paper_shape(n_sigma=3))
    expected = int(sigma_mask(weight, 3).sum())
    assert q.outlier_count == expected > 0
    assert q.outlier_fraction == pytest.approx(expected / weight.numel())


def test_bits_per_weight_counts_everything():
    w = heavy_tailed(64, 512, seed=3)
    q = quantize_weight(w, paper_shape(bits=4, group_size=64))
    nnz = q.outlier_count
    assert 255 < nnz <= 32767  # int16 row pointers
    expected_bytes = 64 * 512 // 2 + 64 * 8 * 2 + 65 * 2 + nnz * (2 + 2)
    assert q.nbytes == expected_bytes
    assert q.bits_per_weight == pytest.approx(8 * expected_bytes / (64 * 512))
    # Without outliers nothing but codes and scales: GPTQ's own bits at per-channel scales.
    plain = quantize_weight(w, paper_shape(bits=3, n_sigma=None))
    assert plain.outlier_rowptr.numel() == 0 and plain.bits_per_weight == 3 + 16 / 512


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), p=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_row_pointers_are_compact_and_exact(rows, cols, p, seed):
    """Row pointers take the narrowest type holding the outlier count and are left out without
    outliers; whatever the layout, they expand to the rows of the mask's entries."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < p
    full = torch.randn(rows, cols, generator=g)
    rowptr, col_idx, values = csr_from_mask(mask, full)
    nnz = int(mask.sum())
    assert rowptr.dtype == (torch.uint8 if nnz <= 255 else torch.int16)
    assert rowptr.numel() == (rows + 1 if nnz else 0)
    qw = QuantizedWeight(
        torch.zeros(rows, packed_cols(cols, 4), dtype=torch.uint8), torch.ones(rows, 1, dtype=torch.float16),
        rowptr, col_idx, values, 4, cols, (rows, cols), torch.float32,
    )  # fmt: skip
    qw.check("w")
    assert torch.equal(qw.row_pointers(), torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]))
    assert torch.equal(qw.add_outliers(torch.zeros(rows, cols)), torch.where(mask, full.half().float(), 0.0))
    for legacy in (rowptr_layout(rows, nnz, compact=False), rowptr_layout(rows, 2**31, compact=False)):
        old = replace(qw, outlier_rowptr=qw.row_pointers().to(legacy[1]))  # as formats 1-5 stored it
        old.check("w")
        assert torch.equal(old.dequantize(), qw.dequantize())
    assert rowptr_layout(rows, 2**15) == ((rows + 1,), torch.int32)


def test_index_dtype_is_narrowest():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(32768) == torch.int16
    assert index_dtype(32769) == torch.int32


SOLVERS_CHECKED = ("search", "paper")
DIGEST = """
import hashlib, sys, torch
sys.path.insert(0, "tests")
from conftest import heavy_tailed
from easyquant import QuantConfig, quantize_weight
for solver in sys.argv[1:]:
    qw = quantize_weight(heavy_tailed(96, 200, seed=1), QuantConfig(bits=3, group_size=32, solver=solver))
    print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in qw.tensors().values())).hexdigest())
"""


def test_deterministic_across_processes():
    """Two fresh processes quantize the same weight to the same bytes, and so does this one, with
    each solver."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", DIGEST, *SOLVERS_CHECKED]
    runs = [subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout.split() for _ in "ab"]
    here = []
    for solver in SOLVERS_CHECKED:
        qw = quantize_weight(heavy_tailed(96, 200, seed=1), QuantConfig(bits=3, group_size=32, solver=solver))
        here.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in qw.tensors().values())).hexdigest())
    assert runs[0] == runs[1] == here and len(set(here)) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes(weight, dtype):
    w = weight.to(dtype)
    q = quantize_weight(w)
    assert q.dtype == dtype and q.dequantize().dtype == dtype
    rel = (q.dequantize().float() - w.float()).norm() / w.float().norm()
    assert rel < 0.12


def test_ragged_last_group():
    w = heavy_tailed(8, 576, seed=4)  # SmolLM2's width; 128 does not divide it
    q = quantize_weight(w, paper_shape(group_size=128))
    assert q.scales.shape == (8, 5)
    assert q.group_size == 128
    # The short last group (64 columns) gets a scale fitted to its own weights.
    last = quantize_weight(w[:, 512:], paper_shape(group_size=64, n_sigma=None))
    q2 = quantize_weight(w, paper_shape(group_size=128, n_sigma=None))
    assert torch.equal(q2.scales[:, 4], last.scales[:, 0])


def test_group_size_larger_than_row_is_per_channel(weight):
    a = quantize_weight(weight, paper_shape(group_size=4096))
    b = quantize_weight(weight, paper_shape(group_size=None))
    assert torch.equal(a.scales, b.scales) and a.group_size == weight.shape[1]


def test_groups_round_trip():
    x = torch.arange(30.0).reshape(3, 10)
    g = to_groups(x, 4)
    assert g.shape == (9, 4)
    assert torch.equal(from_groups(g, 3, 10), x)


def test_zero_and_constant_rows_are_exact():
    w = heavy_tailed(4, 64, seed=5)
    w[1] = 0.0
    w[2] = 0.013
    for scope in ("tensor", "row"):
        q = quantize_weight(w, paper_shape(outlier_scope=scope))
        deq = q.dequantize()
        assert torch.equal(deq[1], torch.zeros(64))
        assert torch.allclose(deq[2], torch.full((64,), 0.013), rtol=1e-3)


def test_all_zero_tensor():
    q = quantize_weight(torch.zeros(4, 16))
    assert q.outlier_count == 0 and torch.equal(q.dequantize(), torch.zeros(4, 16))


@pytest.mark.parametrize(
    ("w", "match"),
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(8), "2-D"),
        (torch.ones(2, 3, 4), "2-D"),
        (torch.ones(0, 4), "empty"),
        (torch.ones(4, 4, dtype=torch.int32), "not a floating-point"),
        (torch.ones(4, 4, dtype=torch.int8), "not a floating-point"),
        (torch.full((2, 2), 1e6), "fp16 range"),
    ],
)
def test_bad_weights_are_named(w, match):
    with pytest.raises(EasyQuantError, match=rf"layers\.0\.q_proj: .*{match}"):
        quantize_weight(w, name="layers.0.q_proj")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, "bits must be"),
        ({"bits": 9}, "bits must be"),
        ({"group_size": 0}, "group_size"),
        ({"n_sigma": -1.0}, "n_sigma"),
        ({"n_sigma": float("nan")}, "n_sigma"),
        ({"solver": "magic"}, "unknown solver"),
        ({"outlier_scope": "column"}, "outlier_scope"),
        ({"lr": 1e-4}, "solver 'search' takes neither"),
        ({"solver": "paper", "lr": -1.0}, "lr must be"),
        ({"solver": "paper", "steps": 0}, "steps must be"),
        ({"solver": "paper", "steps": 2.5}, "steps must be"),
        ({"orient": "no"}, "orient must be"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(EasyQuantError, match=match):
        QuantConfig(**kwargs)


def test_n_sigma_isolating_many_weights_is_refused(weight):
    with pytest.raises(EasyQuantError, match=r"w\.down: n_sigma=0\.5 .* outliers"):
        quantize_weight(weight, paper_shape(n_sigma=0.5), name="w.down")


def test_n_sigma_isolating_some_weights_warns(weight):
    with pytest.warns(UserWarning, match="outliers"):
        quantize_weight(weight, paper_shape(n_sigma=1.6))


def test_bad_col_weight(weight):
    with pytest.raises(EasyQuantError, match="col_weight"):
        quantize_weight(weight, col_weight=torch.ones(3))
    with pytest.raises(EasyQuantError, match="col_weight"):
        quantize_weight(weight, col_weight=-torch.ones(weight.shape[1]))


def test_col_weight_trades_error_toward_heavy_columns():
    w = heavy_tailed(64, 256, seed=6)
    cw = torch.ones(256)
    cw[:32] = 100.0
    plain = quantize_weight(w, paper_shape(bits=3, p=2.0))
    weighted = quantize_weight(w, paper_shape(bits=3, p=2.0), col_weight=cw)

    def heavy_err(q):
        return (q.dequantize() - w)[:, :32].square().sum()

    assert heavy_err(weighted) < heavy_err(plain)


def test_paper_settings_and_orientation(weight):
    """The paper's LLaMA setting (lr 1e-4, 500 steps) reaches the solver; orient=False keeps
    every scale positive, as the paper's grid does, and clips the rows whose peak is positive."""
    from easyquant.core.solvers import PaperAdam

    w = weight
    llama = paper_shape(solver="paper", lr=1e-4, steps=500, n_sigma=None)
    assert llama.make_solver() == PaperAdam(lr=1e-4, steps=500)
    assert not torch.equal(
        quantize_weight(w, llama).scales, quantize_weight(w, paper_shape(solver="paper", n_sigma=None)).scales
    )
    plain = quantize_weight(w, paper_shape(solver="rtn", n_sigma=None, orient=False))
    oriented = quantize_weight(w, paper_shape(solver="rtn", n_sigma=None))
    assert bool((plain.scales > 0).all()) and bool((oriented.scales < 0).any())
    flipped = (oriented.scales < 0).squeeze(1)  # rows whose largest weight is positive
    assert torch.equal(plain.scales[~flipped], oriented.scales[~flipped])
    err = lambda q: (q.dequantize() - w).square().sum(dim=1)  # noqa: E731
    assert bool((err(plain)[flipped] >= err(oriented)[flipped]).all())
