"""Greedy generation with vLLM, run in the vLLM environment (``.venv-vllm``, see
scripts/setup.sh) by tests/test_vllm.py: vLLM pins its own torch and transformers, so it lives
beside the main environment rather than in it.

    python tests/vllm_generate.py JOBS.json

JOBS.json is a list of jobs, ``{"model": DIR, "prompt_ids": [[1, 2, 3]], "max_tokens": 16, "tp": 1}``
(``dtype`` defaults to float32; ``"ep": true`` splits mixture-of-experts layers by experts),
served one after another in this one process, so that vLLM is imported once for all of them.
Prints one line per job, "vllm_generate: " and JSON: the job's index, the generated token ids
per prompt, the log-probability of each prompt token after the first and the quantization
method vLLM selected; or the job's error, and the next job goes on.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

MARK = "vllm_generate: "  # vLLM logs to stdout too: the result line carries this prefix


def generate(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tp = job.get("tp", 1)
    if tp > 1:  # vLLM's CPU workers bind to NUMA nodes unless told which cores each rank gets
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % os.cpu_count()) for r in range(tp))
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    llm = LLM(
        model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, gpu_memory_utilization=0.25,
        skip_tokenizer_init=True, tensor_parallel_size=tp, enable_expert_parallel=job.get("ep", False),
    )  # fmt: skip
    try:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompt_ids"]]
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        scored = [  # log-probability of each prompt token after the first, as the model scored it
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)] for o in outs
        ]
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_logprobs": scored,
            "quant": llm.llm_engine.model_config.quantization,
        }
    finally:  # the engine's processes and memory go before the next job's start
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    # The engine in this process (a tensor-parallel engine still starts its rank workers): no
    # engine process to start per job; and a KV cache that tiny models need, not a share of RAM.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for i, job in enumerate(jobs):
        try:
            result = {"job": i, **generate(job)}
        except Exception as e:  # reported with the job, so the others still run
            traceback.print_exc()
            result = {"job": i, "error": f"{type(e).__name__}: {e}"}
        print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
