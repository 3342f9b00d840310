"""Greedy generation with vLLM, run in the vLLM environment (``.venv-vllm``, see
scripts/setup.sh) by tests/test_vllm.py: vLLM pins its own torch and
transformers, so it lives beside the main environment rather than in it.

    python tests/vllm_generate.py MODEL --prompt-ids '[[1, 2, 3]]' --max-tokens 16 [--dtype float32] [--tp 2]

Prints one line, "vllm_generate: " and JSON: the generated token ids per prompt, the log-probability
of each prompt token after the first, and the quantization method vLLM selected.
"""

from __future__ import annotations

import argparse
import json
import os

MARK = "vllm_generate: "  # vLLM logs to stdout too: the result line carries this prefix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", required=True, help="JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (one CPU worker per rank)")
    a = ap.parse_args()
    if a.tp > 1:  # vLLM's CPU workers bind to NUMA nodes unless told which cores each rank gets
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % os.cpu_count()) for r in range(a.tp)))

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=a.model, dtype=a.dtype, enforce_eager=True, gpu_memory_utilization=0.25,
        skip_tokenizer_init=True, tensor_parallel_size=a.tp,
    )  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(a.prompt_ids)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    quant = llm.llm_engine.model_config.quantization
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # log-probability of each prompt token after the first, as the model scored it
    scored = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)] for o in outs]
    print(MARK + json.dumps({"tokens": tokens, "prompt_logprobs": scored, "quant": quant}))


if __name__ == "__main__":
    main()
