"""Greedy generation with vLLM, run in the vLLM environment (``.venv-vllm``, see
scripts/setup.sh) by tests/test_vllm.py and bench/vllm_speed.py: vLLM pins its own torch and
transformers, so it lives beside the main environment rather than in it.

    python tests/vllm_runner.py MODEL --prompt-ids '[[1, 2, 3]]' --max-tokens 16 [--dtype float32]

Prints one line, "vllm_runner: " and JSON: the generated token ids per prompt, the log-probability
of each prompt token after the first, the seconds generation took, and the quantization method
vLLM selected.
"""

from __future__ import annotations

import argparse
import json
import time

MARK = "vllm_runner: "  # vLLM logs to stdout too: the result line carries this prefix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", required=True, help="JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=1, help="generate this many times; time the last")
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=a.model, dtype=a.dtype, max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.25,
        skip_tokenizer_init=True,
    )  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(a.prompt_ids)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    quant = llm.llm_engine.model_config.quantization
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # log-probability of each prompt token after the first, as the model scored it
    scored = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)] for o in outs]
    print(MARK + json.dumps({"tokens": tokens, "prompt_logprobs": scored, "seconds": seconds, "quant": quant}))


if __name__ == "__main__":
    main()
