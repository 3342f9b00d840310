"""Quality of a causal LM on a text: perplexity over non-overlapping windows (GPTQ protocol).

The text is tokenized once and cut into consecutive windows of ``window`` tokens (the last
partial window is dropped); perplexity is exp of the mean next-token loss over all of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    n = min(n, max_windows or n)
    return ids[: n * window].reshape(n, window)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, desc: str = "perplexity", batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch), desc=desc, unit="batch", leave=False):
        x = windows[i : i + batch].to(model.device)
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def read_text(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")
