"""Greedy generation with vLLM, run in the vLLM environment (``.venv-vllm``, see
scripts/setup.sh) by tests/test_vllm.py: vLLM pins its own torch and transformers, so it lives
beside the main environment rather than in it.

    python tests/vllm_generate.py JOBS.json

JOBS.json is a list of jobs, ``{"model": DIR, "prompt_ids": [[1, 2, 3]], "max_tokens": 16, "tp": 1}``
(``dtype`` defaults to float32; ``"ep": true`` splits mixture-of-experts layers by experts).
Tensor-parallel jobs run under vLLM's ``external_launcher`` executor: this script starts one
process per rank (as torchrun would), each imports vLLM once and builds every engine as that
rank, one after another; single-rank jobs then run in rank 0. (vLLM's default executor on the
CPU spawns fresh rank workers for every engine: each imports vLLM again, about 10 s an engine.)
Rank 0 prints one line per job, "vllm_generate: " and JSON: the job's index, the generated
token ids per prompt, the log-probability of each prompt token after the first and the
quantization method vLLM selected; or the error of a single-rank job, and the next job goes on
(a tensor-parallel job's error ends the run: its ranks would no longer meet).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import traceback

MARK = "vllm_generate: "  # vLLM logs to stdout too: the result line carries this prefix


def generate(job: dict, port: int | None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tp = job.get("tp", 1)
    parallel = {}
    if tp > 1:  # this process is one rank; a fresh rendezvous port per engine (stale addresses otherwise)
        os.environ["MASTER_PORT"] = str(port)
        parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "external_launcher"}
    llm = LLM(
        model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, gpu_memory_utilization=0.25,
        skip_tokenizer_init=True, enable_expert_parallel=job.get("ep", False), **parallel,
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
    finally:  # the engine's memory and process groups go before the next job's start
        if tp > 1:
            import torch.distributed as dist

            dist.barrier()  # both ranks done before either tears its groups down
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if tp > 1:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()


def run_rank(jobs: list[dict], rank: int, ports: list[int | None]) -> None:
    # The engine in this process, no engine-core process per job; a KV cache that tiny models
    # need, not a share of RAM.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for i in sorted(range(len(jobs)), key=lambda i: jobs[i].get("tp", 1) == 1):  # tensor-parallel jobs first
        tp = jobs[i].get("tp", 1)
        if tp == 1 and rank > 0:
            continue
        if tp > 1:  # vLLM's CPU workers bind to NUMA nodes unless told which core each rank gets
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % os.cpu_count()) for r in range(tp))
        else:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        try:
            result = {"job": i, **generate(jobs[i], ports[i])}
        except Exception as e:
            traceback.print_exc()
            result = {"job": i, "error": f"{type(e).__name__}: {e}"}
            if tp > 1:
                print(MARK + json.dumps(result), flush=True)
                os._exit(1)
        if rank == 0:
            print(MARK + json.dumps(result), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    if "RANK" in os.environ:
        run_rank(jobs, int(os.environ["RANK"]), json.loads(os.environ["JOB_PORTS"]))
        return
    world = max(j.get("tp", 1) for j in jobs)
    if any(j.get("tp", 1) not in (1, world) for j in jobs):
        raise SystemExit("every job's tp must be 1 or the largest tp")
    ports = [free_port() if j.get("tp", 1) > 1 else None for j in jobs]
    env = {**os.environ, "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "JOB_PORTS": json.dumps(ports)}  # fmt: skip
    ranks = []
    for r in range(world):  # only rank 0 reports
        rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        out = None if r == 0 else subprocess.DEVNULL
        ranks.append(subprocess.Popen([sys.executable, __file__, sys.argv[1]], env=rank_env, stdout=out))
    while all(rank.poll() in (None, 0) for rank in ranks) and any(rank.poll() is None for rank in ranks):
        time.sleep(0.2)
    for rank in ranks:  # a rank that failed leaves the others waiting for it in a collective
        if rank.poll() is None:
            rank.kill()
    sys.exit(0 if all(rank.wait() == 0 for rank in ranks) else 1)


if __name__ == "__main__":
    main()
