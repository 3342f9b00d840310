"""Streaming benchmark: peak memory of `easyquant quantize` against the model's size.

Writes a synthetic Llama-shaped checkpoint (fp16, sharded, several GB, random heavy-tailed
weights; written one tensor at a time), then quantizes it in a child process and reports the
child's peak resident memory (ru_maxrss) against the checkpoint size and the largest tensor.

    python bench/stream.py [--layers 24] [--hidden 2048] [--intermediate 5632] [--workers 1]
    python bench/stream.py --experts 16 ...   # Mixtral-shaped: fused 3-D experts tensors
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

import torch

from easyquant.checkpoint.st_io import Entry, atomic_write_json, write_safetensors


def synthetic_checkpoint(
    folder: Path, layers: int, hidden: int, inter: int, vocab: int, per_shard: int, experts: int = 0
) -> int:
    """A Llama-shaped checkpoint, or with ``experts`` a Mixtral-shaped one whose experts are the
    fused 3-D tensors transformers 5 holds (``mlp.experts.gate_up_proj`` ...), plus a router."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if experts:
            shapes |= {
                p + "mlp.gate.weight": (experts, hidden),
                p + "mlp.experts.gate_up_proj": (experts, 2 * inter, hidden),
                p + "mlp.experts.down_proj": (experts, hidden, inter),
            }
        else:
            shapes |= {
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }

    def make(name: str, shape: tuple[int, ...]):
        def load() -> torch.Tensor:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.float16)
            t = torch.randn(shape, generator=g) / (torch.randn(shape, generator=g).abs() + 0.5) * 0.01
            return t.clamp(-1, 1).half()

        return Entry(name, torch.float16, shape, load)

    entries = [make(k, v) for k, v in sorted(shapes.items())]
    shards: list[list[Entry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > per_shard:
            shards.append([])
        shards[-1].append(e)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(folder / name, shard, {"format": "pt"})
        weight_map |= {e.name: name for e in shard}
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    config = {
        "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if experts else "llama",
        **({"num_local_experts": experts, "num_experts_per_tok": 2} if experts else {}),
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "torch_dtype": "float16",
        "tie_word_embeddings": False,
    }
    atomic_write_json(folder / "config.json", config)
    return sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=0, help="experts per layer (0: a dense Llama)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("bench/results/stream.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        model_bytes, largest = synthetic_checkpoint(
            src, args.layers, args.hidden, args.intermediate, args.vocab, 1 << 30, args.experts
        )
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "easyquant.cli", "quantize", str(src), str(out), "--workers", str(args.workers)]
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    row = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "cpus": torch.get_num_threads(),
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "experts": args.experts,
        "workers": args.workers,
        "model_bytes": model_bytes,
        "largest_tensor_bytes": largest,
        "output_bytes": out_bytes,
        "peak_rss_bytes": peak,
        "seconds": seconds,
    }
    gib = 2**30
    print("| model (fp16) | largest tensor | output | peak RSS | peak / model | peak / largest tensor | time |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {model_bytes / gib:.2f} GiB | {largest / 2**20:.0f} MiB | {out_bytes / gib:.2f} GiB | "
        f"{peak / gib:.2f} GiB | "
        f"{peak / model_bytes:.2f} | {peak / largest:.1f} | {seconds:.0f} s |"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
