"""The benchmarks' reduced CPU form runs end to end, so that they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the reduced form is the CPU one")
def test_kernel_bench_reduced_form(tmp_path):
    out = tmp_path / "kernel.json"
    args = ["--shapes", "cpu", "--batches", "1,3", "--fractions", "0,0.01", "--new-tokens", "2", "--reps", "1"]
    proc = subprocess.run([sys.executable, "bench/kernel.py", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| shape | batch |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["interpreted"] is True
    layers = result["layers"]
    assert len(layers) == 2 * 3 * 2  # shapes x (no outliers, uniform, skewed) x batches
    assert {r["layout"] for r in layers} == {"uniform", "skewed"}
    assert all(r["fused_us"] > 0 and r["balanced_us"] > 0 for r in layers)
    assert {r["shape"] for r in layers} == {"256x512", "512x256"}
    assert all(r["kernel_us"] > 0 and r["speedup_vs_fp16"] > 0 for r in layers)
    assert any(r["outlier_fraction"] > 0.005 for r in layers)
    (decode,) = result["decode"]
    assert decode["easyquant_tokens_per_s"] > 0 and decode["easyquant_gib"] < decode["fp16_gib"]
