"""Quantizers judged on weights nobody quantized before: a sentence encoder (all-MiniLM-L6-v2).

Each method quantizes a copy of the encoder in memory; sentences are embedded by mean pooling
(as sentence-transformers does for this model) and L2-normalised. Measures against the
full-precision encoder: cosine similarity of each sentence's two embeddings (mean, and the
1st percentile, i.e. the worst 1%), and nearest-neighbour agreement: the share of sentences
whose most similar other sentence is the same under both encoders.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint.targets import block_linears
from .compare import Scores, resolve


def sentences(text: str, limit: int = 400, min_words: int = 5) -> list[str]:
    parts = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in parts if len(s.split()) >= min_words][:limit]


@torch.inference_mode()
def embed(model: nn.Module, batch: dict, chunk: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, batch["input_ids"].shape[0], chunk):
        part = {k: v[i : i + chunk] for k, v in batch.items()}
        h = model(**part).last_hidden_state
        mask = part["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.argmax(-1)


@dataclass(frozen=True)
class EncoderRow:
    method: str
    bits: int
    bits_per_weight: float
    cos_mean: float
    cos_p1: float
    nn_agreement: float
    seconds: float


def encoder_compare(
    model: nn.Module, batch: dict, calib: torch.Tensor, methods: list[str], bits: list[int]
) -> list[EncoderRow]:
    scores: Scores = {}  # each copy starts from the same weights
    runs = {name: resolve(name, scores) for name in methods}
    model.eval()
    ref = embed(model, batch)
    ref_nn = _neighbours(ref)
    rows = []
    for b in bits:
        for name, run in runs.items():
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            result = run(m, block_linears(m), b, calib)
            seconds, bpw = time.perf_counter() - t0 + result.reused_seconds, result.bits_per_weight
            e = embed(m, batch)
            cos = (e * ref).sum(-1)
            agree = (_neighbours(e) == ref_nn).float().mean().item()
            rows.append(EncoderRow(name, b, bpw, cos.mean().item(), cos.quantile(0.01).item(), agree, seconds))
    return rows


def encoder_markdown(rows: list[EncoderRow]) -> str:
    lines = [
        "| method | bits | bits/weight | cosine mean | cosine p1 | nearest-neighbour agreement | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.bits} | {r.bits_per_weight:.3f} | {r.cos_mean:.5f} | {r.cos_p1:.5f} | "
        f"{r.nn_agreement:.2%} | {r.seconds:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)
