"""The benchmarks' reduced CPU form runs end to end, so that they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the reduced form is the CPU one")
def test_kernel_bench_reduced_form(tmp_path):
    out = tmp_path / "kernel.json"
    args = ["--shapes", "cpu", "--batches", "1,3", "--fractions", "0,0.01", "--new-tokens", "2", "--reps", "1",
            "--decode", "eager,compiled"]  # fmt: skip
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
    eager, compiled = result["decode"]  # compiled: static cache, fullgraph through the custom ops
    assert not eager["compiled"] and compiled["compiled"]
    assert all(d["easyquant_tokens_per_s"] > 0 and d["easyquant_gib"] < d["fp16_gib"] for d in (eager, compiled))


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the reduced form is the CPU one")
def test_tile_search_reduced_form(tmp_path):
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, "bench/tune.py", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| shape | batch |" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tried"] == 5 and not row["rejected"]  # the default and its 4 neighbours, all agreeing
    assert 0 < row["best_us"] <= row["default_us"]
    assert row["best"]["block_n"] in (16, 32, 64) and row["best"]["split_k"] in (1, 2, 4)


def test_kernels_compile_for_h100(tmp_path):
    """The kernels as qmatmul launches them compile for sm_90 with Triton's own ptxas, and the
    machine code keeps the properties speed depends on: no spills on the decode path, the
    packed 4-bit codes loaded 128 bits wide and ahead of use (async copies), tensor-core MMAs
    for batches of 16 and more."""
    pytest.importorskip("triton")
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/compiled.py", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["meta"]["target"] == "sm_90"
    rows = result["rows"]
    assert {r["kernel"] for r in rows} == {"qmatmul_kernel", "outlier_kernel", "dequantize_kernel"}
    assert {r["weight"] for r in rows} >= {f"{b}-bit" for b in range(2, 9)} | {"4-bit g128", "4-bit g100"}
    assert all(r["registers"] <= 255 for r in rows)
    matmuls = [r for r in rows if r["kernel"] == "qmatmul_kernel"]
    decode = [r for r in matmuls if r["batch"] == 1 and r["weight"] != "4-bit g100"]  # ragged groups: gathers
    assert decode and all(r["stack_bytes"] == 0 for r in decode)
    four_bit = [r for r in decode if r["weight"].startswith("4-bit")]
    assert four_bit and all("128" in r["loads_by_bits"] and r["pipelined"] for r in four_bit)
    assert all(r["tensor_cores"] != "-" for r in matmuls if r["batch"] >= 16)
    assert "| kernel | shape |" in proc.stdout


def test_cpu_bench_reduced_form(tmp_path):
    out = tmp_path / "cpu.json"
    args = ["--shapes", "cpu", "--batches", "1,3", "--model", "tiny", "--new-tokens", "2", "--reps", "1"]
    proc = subprocess.run([sys.executable, "bench/cpu.py", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| shape | batch |" in proc.stdout
    result = json.loads(out.read_text())
    layers, decode = result["layers"], result["decode"]
    assert [(r["shape"], r["batch"]) for r in layers] == [(s, b) for s in ("256x512", "512x256") for b in (1, 3)]
    assert all(r["bf16_path"] == "int4" and r["outlier_fraction"] > 0 for r in layers)
    assert all(r[f"{w}_{d}_us"] > 0 for r in layers for w in ("dense", "easyquant") for d in ("fp32", "bf16"))
    assert [(d["weights"], d["dtype"]) for d in decode] == [
        ("dense", "fp32"), ("dense", "bf16"), ("easyquant", "fp32"), ("easyquant", "bf16")]  # fmt: skip
    assert all(d["tokens_per_s"] > 0 for d in decode)


def test_model_time_reduced_form(tmp_path):
    """bench/model_time.py on a tiny Llama: easyquant's whole CLI run and the peers over the same
    target weights (every block linear), each with its time and ratios to HQQ and SINQ."""
    from conftest import tiny_model

    model = tiny_model("llama", tmp_path / "src")
    out = tmp_path / "time.json"
    proc = subprocess.run([sys.executable, "bench/model_time.py", str(tmp_path / "src"), "--workers", "1", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    linears = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers") and
                  isinstance(m, torch.nn.Linear))  # fmt: skip
    assert result["meta"]["target_weights"] == linears
    names = [r["method"].split(" (")[0] for r in result["rows"]]
    assert names == ["hqq g64", "sinq g64", "easyquant quantize, defaults, --workers 1"]
    assert all(r["seconds"] > 0 and r["mweights_per_s"] > 0 for r in result["rows"])
    assert result["rows"][0]["x_hqq_g64"] == 1 and result["rows"][1]["x_sinq_g64"] == 1
    assert "| method | seconds |" in proc.stdout
