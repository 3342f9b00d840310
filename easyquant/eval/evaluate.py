"""Quality of a causal LM against a text and against a reference model.

Protocol (GPTQ's): the text is tokenized once and cut into consecutive, non-overlapping
windows of ``window`` tokens (the last partial window is dropped). Perplexity is exp of the
mean next-token loss over every position of every window. Against a reference model on the
same windows: KL(reference || model) of the next-token distributions per position (mean and
99th percentile) and top-1 agreement (the two argmaxes equal), which are far less noisy than
perplexity on a small corpus.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import progress_bar


def read_text(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    n = min(n, max_windows or n)
    return ids[: n * window].reshape(n, window)


def _batches(windows: torch.Tensor, batch: int, desc: str):
    for i in progress_bar(range(0, len(windows), batch), desc=desc, unit="batch", leave=False):
        yield windows[i : i + batch]


@torch.inference_mode()
def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(x.to(model.device)).logits[:, :-1].float(), dim=-1).cpu()


@dataclass
class Reference:
    """The reference model's next-token log-probabilities on the windows (kept in bf16 to
    bound memory) and its top-1 tokens (taken before that rounding, so ties stay exact)."""

    windows: torch.Tensor
    logprobs: list[torch.Tensor]
    top1: list[torch.Tensor]
    batch: int

    @classmethod
    def of(cls, model, windows: torch.Tensor, batch: int = 4) -> Reference:
        lps = [_logprobs(model, x) for x in _batches(windows, batch, "reference")]
        return cls(windows, [lp.bfloat16() for lp in lps], [lp.argmax(-1) for lp in lps], batch)


@dataclass(frozen=True)
class Quality:
    perplexity: float
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    return evaluate(model, windows, batch=batch).perplexity


def evaluate(model, windows: torch.Tensor, reference: Reference | None = None, batch: int = 4) -> Quality:
    nll, kls, agree, count = 0.0, [], 0, 0
    if reference is not None:
        assert torch.equal(reference.windows, windows), "the reference was computed on other windows"
        batch = reference.batch
    for i, x in enumerate(_batches(windows, batch, "evaluating")):
        lp = _logprobs(model, x)
        target = x[:, 1:]
        nll -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if reference is not None:
            ref = reference.logprobs[i].float()
            kls.append((ref.exp() * (ref - lp)).sum(-1).flatten())
            agree += (reference.top1[i] == lp.argmax(-1)).sum().item()
    if reference is None:
        return Quality(math.exp(nll / count))
    kl = torch.cat(kls)
    return Quality(math.exp(nll / count), kl.mean().item(), kl.quantile(0.99).item(), agree / count)


@torch.inference_mode()
def generation_speed(model, prompt: torch.Tensor, new_tokens: int, warmup: int = 2) -> float:
    """Tokens per second of greedy generation (batch 1, exactly ``new_tokens`` tokens, after a
    warm-up run of ``warmup`` tokens: more for compiled models, which compile and record then),
    synchronised on a GPU."""
    prompt = prompt.to(model.device)
    kw = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    model.generate(prompt, **{**kw, "max_new_tokens": warmup, "min_new_tokens": warmup})
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    sync()
    return new_tokens / (time.perf_counter() - t0)
