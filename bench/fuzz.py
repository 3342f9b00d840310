"""Loader fuzz: mutated easyquant checkpoints through ``from_pretrained``.

A tiny Llama (random weights, 4-bit groups of 32, n-sigma 2 so every layer has outliers) is
quantized once; each case copies that checkpoint, applies one seeded mutation and loads it:

- ``header``: random bytes of the safetensors header (its length field or its JSON) overwritten;
- ``entry``: one tensor's header entry edited (shape, dtype or data offsets; the file no longer
  adds up), or the file cut short;
- ``tensor``: a well-formed file whose quantized tensor has another shape or dtype;
- ``csr``: the outlier row pointers or columns overwritten (inside and outside the matrix),
  the scales or outlier values made NaN/Inf, or the packed codes randomised;
- ``config``: a ``quantization_config`` value replaced, removed or added (all but
  ``quant_method``: with another method name the file is no easyquant checkpoint, and
  transformers never calls easyquant to load it).

Every case must end in an ``EasyQuantError`` ("refused") or a correct load ("loaded": every
quantized tensor equals the file's, and a forward pass runs on the torch and the CPU int4
paths). Anything else is a failure: another exception, a hang (a 60 s alarm per case) or a
crash (the process dies, which the caller sees).

    python bench/fuzz.py [--cases 10000] [--seed 0] [--json bench/results/fuzz.json]
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from workloads import quiet_transformers, save_random_llama, trial_args, trial_meta

import easyquant  # noqa: F401  (registers the loader)
from easyquant import EasyQuantError, QuantConfig
from easyquant.checkpoint.pipeline import quantize_model
from easyquant.runtime.nn import QUANTIZED_TENSORS, EasyQuantLinear

KINDS = ("header", "entry", "tensor", "csr", "config")
ODD_VALUES = [None, -1, 0, 1, 3, 9, 2**40, 10**18, -(2**63), 1.5, float("nan"), "4", "", [], {}, [4], {"a": 1}, True]


def base_checkpoint(folder: Path) -> Path:
    save_random_llama(folder / "src", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      max_position_embeddings=32)  # fmt: skip
    quantize_model(folder / "src", folder / "q", QuantConfig(group_size=32, n_sigma=2.0), progress=False)
    return folder / "q"


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _quantized_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k.rsplit(".", 1)[-1] in QUANTIZED_TENSORS)


def mutate(folder: Path, kind: str, rng: random.Random) -> str:
    """Apply one mutation of ``kind`` to the checkpoint in ``folder``; returns what was done."""
    shard = folder / "model.safetensors"
    if kind == "header":
        raw = bytearray(shard.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        spots = [rng.randrange(0, 8 + n) for _ in range(rng.choice([1, 1, 2, 4, 16]))]
        for i in spots:
            raw[i] = rng.randrange(256)
        shard.write_bytes(bytes(raw))
        return f"header bytes {spots[:4]}"
    header, data = _split(shard)
    if kind == "entry":
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry, what = header[key], rng.choice(["shape", "dtype", "offsets", "truncate", "drop"])
        if what == "shape":
            dims = entry["shape"] or [1]
            i = rng.randrange(len(dims))
            dims[i] = rng.choice([0, dims[i] + 1, dims[i] * 2, 2**40, -1, dims[i] - 1])
            entry["shape"] = rng.choice([dims, [*dims, 1], dims[:-1], "x"])
        elif what == "dtype":
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I16", "I32", "I64", "BOOL", "Q4", 3])
        elif what == "offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[a, b + 2], [a + 2, b], [b, a], [a, 2**62], [-8, b], [a], "0"])
        elif what == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            del header[key]
        _join(shard, header, data)
        return f"entry {key}: {what}"
    tensors = load_file(shard)
    key = rng.choice(_quantized_keys(header))
    t = tensors[key]
    if kind == "tensor":
        what = rng.choice(["dtype", "shape", "empty"])
        if what == "dtype":
            dtypes = [torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.uint8, torch.bfloat16]
            tensors[key] = t.to(rng.choice(dtypes))
        elif what == "shape":
            tensors[key] = (
                t.reshape(-1)[: max(t.numel() - rng.randrange(1, 3), 0)] if t.numel() > 1 else t.reshape(1, -1)
            )
        else:
            tensors[key] = t[:0]
    elif kind == "csr":
        module = key.rsplit(".", 1)[0]
        field = rng.choice(["outlier_rowptr", "outlier_cols", "outlier_values", "scales", "packed"])
        t = tensors[f"{module}.{field}"]
        if t.numel():
            i = rng.randrange(t.numel())
            flat = t.view(-1)
            if t.dtype.is_floating_point:
                flat[i] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e4, 0.0])
            else:
                info = torch.iinfo(t.dtype)
                flat[i] = rng.choice([info.min, info.max, -1 if info.min < 0 else 0, flat[i].item() + 1, 64, 63, 65])
        key = f"{module}.{field}"
        what = "overwrite one value"
    save_file(tensors, shard, metadata={"format": "pt"}) if kind in ("tensor", "csr") else None
    if kind == "config":
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        qc = cfg["quantization_config"]
        what = rng.choice(["value", "remove", "add", "module", "outliers"])
        keys = sorted(set(qc) - {"quant_method"})
        if what == "value":
            key = rng.choice(keys)
            qc[key] = rng.choice(ODD_VALUES)
        elif what == "remove":
            key = rng.choice(keys)
            del qc[key]
        elif what == "add":
            key = rng.choice(["to_dict", "__class__", "dequantize", "extra", "modules_to_not_convert"])
            qc[key] = rng.choice(ODD_VALUES)
        elif what == "module":
            key = rng.choice(sorted(qc["modules"]))
            qc["modules"][rng.choice([key, key + "x", "lm_head", "model.embed_tokens", "model.norm"])] = rng.choice(
                [*ODD_VALUES, {"outliers": 0}, {"outliers": 1, "x": 2}]
            )
        else:
            key = rng.choice(sorted(qc["modules"]))
            n = qc["modules"][key]["outliers"]
            qc["modules"][key]["outliers"] = rng.choice([n + 1, n - 1, 0, 2**31, 2**62, -n])
        cfg_path.write_text(json.dumps(cfg))
    return f"{kind} {key}: {what}"


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang


def load_and_check(folder: Path) -> str:
    """``refused``, ``loaded`` (and checked), or raises what went wrong."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    except EasyQuantError:
        return "refused"
    stored = load_file(folder / "model.safetensors")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, EasyQuantLinear)]
    assert layers, "loaded without quantized layers"
    for name, module in layers:
        for t in QUANTIZED_TENSORS:
            assert torch.equal(getattr(module, t), stored[f"{name}.{t}"]), f"{name}.{t} differs from the file"
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        model(x)
        model.to(torch.bfloat16)(x)  # CPU int4 kernel + sparse outliers
    return "loaded"


def run(cases: int, seed: int, progress: bool = True) -> dict:
    quiet_transformers()
    signal.signal(signal.SIGALRM, _alarm)
    outcomes: Counter = Counter()
    failures = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = base_checkpoint(Path(tmp))
        assert load_and_check(base) == "loaded"
        case_dir = Path(tmp) / "case"
        for i in range(cases):
            rng = random.Random(seed * 1_000_003 + i)
            kind = KINDS[i % len(KINDS)]
            shutil.rmtree(case_dir, ignore_errors=True)
            shutil.copytree(base, case_dir)
            what = mutate(case_dir, kind, rng)
            signal.alarm(60)
            try:
                result = load_and_check(case_dir)
            except Hang:
                result = "hang"
            except Exception as e:  # anything but a refusal or a correct load is a finding
                result = "failure"
                failures.append({"case": i, "mutation": what, "error": f"{type(e).__name__}: {e}"[:500]})
            finally:
                signal.alarm(0)
            outcomes[(kind, result)] += 1
            if progress and (i + 1) % 500 == 0:
                print(f"{i + 1} cases, {sum(v for (k, r), v in outcomes.items() if r in ('failure', 'hang'))} "
                      "failures", file=sys.stderr, flush=True)  # fmt: skip
    by_kind = {k: {r: outcomes[(k, r)] for r in ("refused", "loaded", "failure", "hang")} for k in KINDS}
    return {"cases": cases, "seed": seed, "seconds": time.perf_counter() - t0, "by_kind": by_kind, "failures": failures}


def main() -> None:
    a = trial_args(__doc__, "cases", 10_000)
    result = run(a.cases, a.seed)
    result["meta"], heading = trial_meta()
    print(f"# Loader fuzz: {a.cases} mutated checkpoints (seed {a.seed}), {result['seconds']:.0f} s\n\n{heading}\n")
    print("| mutation | refused | loaded (checked) | failure | hang |\n|---|---|---|---|---|")
    for kind, r in result["by_kind"].items():
        print(f"| {kind} | {r['refused']} | {r['loaded']} | {r['failure']} | {r['hang']} |")
    for f in result["failures"][:20]:
        print(f"- case {f['case']} ({f['mutation']}): {f['error']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if result["failures"] or any(r["hang"] for r in result["by_kind"].values()) else 0)


if __name__ == "__main__":
    main()
