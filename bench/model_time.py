"""Whole-model quantization time: ``easyquant quantize`` of a checkpoint against HQQ and SINQ on
the same linears, in one run on one machine.

A GGUF source is first staged once into a safetensors folder (fp32, as ``easyquant quantize``
stages it), and every method reads that folder. easyquant runs as the CLI does (a fresh process:
imports, reading, quantizing every target, writing and assembling the checkpoint), once per
worker count asked. The peers quantize the same targets (``find_targets``: the weights easyquant
quantizes), read the same way one at a time, with nothing written: their rows are the peers'
compute plus reading, a lower bound on a whole run of theirs. Ratios are weights per second
against HQQ g64 and SINQ g64.

    python bench/model_time.py SRC [--workers 1,2] [--json bench/results/model-time.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from workloads import format_table

from easyquant.checkpoint.source import open_source, source_note, stage_gguf
from easyquant.checkpoint.targets import find_targets
from easyquant.eval.peers import hqq_quantize, sinq_quantize

PEERS = {"hqq g64": (hqq_quantize, 64), "sinq g64": (sinq_quantize, 64)}


def easyquant_seconds(src: Path, workers: int) -> float:
    """Wall time of ``easyquant quantize SRC OUT --workers N`` in a fresh process, imports included."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "easyquant.cli", "quantize", str(src), f"{tmp}/out", "--workers",
                        str(workers)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        return time.perf_counter() - t0


def peer_seconds(src: Path, peer: str) -> tuple[float, int]:
    """Seconds for ``peer`` over every target weight (each read, then quantized) and the weights' count."""
    fn, group = PEERS[peer]
    with tempfile.TemporaryDirectory() as tmp:
        targets = find_targets(open_source(src, Path(tmp))).targets  # src: a folder, nothing staged
        t0, count = time.perf_counter(), 0
        for target in targets:
            w = target.source.load().float()
            fn(w, 4, group)
            count += w.numel()
        return time.perf_counter() - t0, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--json")
    a = ap.parse_args()
    src, rows = Path(a.src), []
    note = source_note(src)
    staging = tempfile.TemporaryDirectory()
    if src.is_file():
        src = stage_gguf(src, Path(staging.name) / "hf")
    for peer in PEERS:
        seconds, weights = peer_seconds(src, peer)
        rows.append({"method": f"{peer} (targets read and quantized, nothing written)", "seconds": seconds})
    for workers in (int(w) for w in a.workers.split(",")):
        rows.append({"method": f"easyquant quantize, defaults, --workers {workers} (whole run)",
                     "seconds": easyquant_seconds(src, workers)})  # fmt: skip
    hqq, sinq = rows[0]["seconds"], rows[1]["seconds"]
    for r in rows:
        r |= {"mweights_per_s": weights / r["seconds"] / 1e6, "x_hqq_g64": hqq / r["seconds"],
              "x_sinq_g64": sinq / r["seconds"]}  # fmt: skip
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "source": note, "target_weights": weights}  # fmt: skip
    print(f"{meta['source']}; {weights / 1e9:.3f}B target weights; {meta['machine']}; {meta['date']}")
    print(format_table(rows, [("method", "method", "{}"), ("seconds", "seconds", "{:.1f}"),
                              ("Mweights/s", "mweights_per_s", "{:.2f}"), ("x HQQ g64", "x_hqq_g64", "{:.2f}"),
                              ("x SINQ g64", "x_sinq_g64", "{:.2f}")]))  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    staging.cleanup()


if __name__ == "__main__":
    main()
