"""How well and how fast the bit budget scores its menu: round-to-nearest errors against solves.

``--target-bpw`` scores each layer at twelve settings (``menu``) and picks one per layer under
the budget. It scores by round-to-nearest at max-abs ranges without column scales
(``score``); the first version solved every setting as the final quantization does. Per matrix
set and budget this prints the plan each scoring chooses, the solved weight error of both
plans (the quantity the plan minimises; the solved scoring's plan is the best the knapsack
finds for it) and how many layers differ; and per set the time of each scoring as a multiple
of the default's quantization of the same matrices, measured in the same run.

    python bench/budget_scoring.py [--budgets 4.25,4.5] [--json bench/results/budget-scoring.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from core import minilm_linears, smollm2_linears
from workloads import format_table

from easyquant import QuantConfig, quantize_weight
from easyquant.core.allocate import Choice, allocate, menu, score


def solved_row(w: torch.Tensor, options: list[QuantConfig]) -> list[Choice]:
    """Every setting solved and packed, scored by its relative squared error and stored size."""
    row, x = [], w.float()
    for c in options:
        q = quantize_weight(w, c)
        err = ((q.dequantize(torch.float32) - x).square().sum() / x.square().sum()).item()
        row.append(Choice(8 * q.nbytes, err * w.numel()))
    return row


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4.25,4.5")
    ap.add_argument("--json", type=Path, default=Path("bench/results/budget-scoring.json"))
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    options = menu(QuantConfig())
    sets = {
        "SmolLM2 layers 0,10,20,29 (Q4_1 source)": smollm2_linears([0, 10, 20, 29]),
        "all-MiniLM-L6-v2 (fp32 source)": minilm_linears(),
    }
    rows = []
    for label, mats in sets.items():
        names = list(mats)
        total = sum(w.numel() for w in mats.values())
        _, default_s = timed(lambda: [quantize_weight(w, QuantConfig()) for w in mats.values()])  # noqa: B023
        solved, solved_s = timed(lambda: {n: solved_row(w, options) for n, w in mats.items()})  # noqa: B023
        rtn, rtn_s = timed(lambda: score([(n, lambda w=w: w) for n, w in mats.items()], options, False)[0])  # noqa: B023
        for budget in budgets:
            plans = {k: allocate([t[n] for n in names], budget * total) for k, t in (("solved", solved), ("rtn", rtn))}

            def error(plan: list[int]) -> float:
                return sum(solved[n][i].error for n, i in zip(names, plan, strict=True)) / total  # noqa: B023

            rows.append(
                {
                    "matrices": label,
                    "budget": budget,
                    "solved_plan_error": error(plans["solved"]),
                    "rtn_plan_error": error(plans["rtn"]),
                    "rtn_plan_bits": sum(rtn[n][i].bits for n, i in zip(names, plans["rtn"], strict=True)) / total,
                    "layers_differing": sum(a != b for a, b in zip(plans["solved"], plans["rtn"], strict=True)),
                    "layers": len(names),
                    "solved_scoring_x_default": solved_s / default_s,
                    "rtn_scoring_x_default": rtn_s / default_s,
                }
            )
            r = rows[-1]
            print(f"{label} {budget}: {r}", flush=True)
    meta = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "note": "SmolLM2 weights come from a GGUF Q4_1 file: they were 4-bit quantized once (blocks of 32).",
    }
    print(f"\n{meta['date']}, {meta['machine']}, {meta['threads']} threads")
    shown = [r | {"error_ratio": r["rtn_plan_error"] / r["solved_plan_error"],
                  "differing": f"{r['layers_differing']}/{r['layers']}",
                  "scoring_x_default": f"{r['solved_scoring_x_default']:.1f} / {r['rtn_scoring_x_default']:.2f}"}
             for r in rows]  # fmt: skip
    print(format_table(shown, [("matrices", "matrices", "{}"), ("budget", "budget", "{}"),
                              ("solved plan's error", "solved_plan_error", "{:.6f}"),
                              ("RTN plan's error", "rtn_plan_error", "{:.6f}"), ("ratio", "error_ratio", "{:.4f}"),
                              ("layers differing", "differing", "{}"),
                              ("scoring time x default: solved / RTN", "scoring_x_default", "{}")]))  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
