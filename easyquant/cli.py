"""The ``easyquant`` command: ``quantize`` a checkpoint, ``compare`` methods, or run the built-in ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import transformers

from .checkpoint.pipeline import SUMMARY, Options, quantize_model
from .checkpoint.source import source_note
from .core.fold import FOLD_MODES
from .core.quantize import OUTLIER_RULES, QuantConfig
from .core.solvers import SOLVERS
from .errors import EasyQuantError
from .eval.compare import DEFAULT_METHODS, resolve
from .progress import interactive

DTYPES = ("bfloat16", "float32", "float16")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, help="2 to 8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="columns per scale (default 64)")
    p.add_argument("--per-channel", action="store_true", help="one scale per row instead of groups")
    p.add_argument("--n-sigma", type=float, default=4.0, help="outlier threshold in standard deviations (default 4)")
    p.add_argument("--no-outliers", action="store_true", help="keep no fp16 outliers")
    p.add_argument("--outlier-scope", choices=["tensor", "row"], default="tensor")
    p.add_argument(
        "--outlier-rule",
        choices=list(OUTLIER_RULES),
        default="sigma",
        help="which weights to keep in fp16: past n sigma (default), or as many as that, chosen by how much their "
        "removal lowers the range loss (savings: a few more solves per matrix)",
    )
    p.add_argument("--solver", choices=list(SOLVERS), default="search", help="range solver (default search)")
    p.add_argument("--p", type=float, default=None, help="norm of the range objective (solver default if unset)")
    p.add_argument("--adam-lr", type=float, default=None, help="paper solver: Adam's step (default 1e-3)")
    p.add_argument("--adam-steps", type=int, default=None, help="paper solver: Adam's steps (default 100)")
    p.add_argument(
        "--no-orient", action="store_true", help="positive scales, as the paper (default: largest weight on qmin)"
    )
    p.add_argument(
        "--asymmetric",
        action="store_true",
        help="an integer zero point per row or group beside the scale (solver search or rtn)",
    )
    p.add_argument(
        "--fractional-zero",
        action="store_true",
        help="with --asymmetric: the zero point in fractions of a code, still one byte (format 5)",
    )
    p.add_argument(
        "--col-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dual-axis scaling: an fp16 scale per input column (Sinkhorn-normalised), applied to the activations "
        "(default on; --no-col-scale keeps GGUF and compressed-tensors exports exact)",
    )


def _config(a: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        bits=a.bits,
        group_size=None if a.per_channel else a.group_size,
        n_sigma=None if a.no_outliers else a.n_sigma,
        outlier_scope=a.outlier_scope,
        outlier_rule=a.outlier_rule,
        solver=a.solver,
        p=a.p,
        lr=a.adam_lr,
        steps=a.adam_steps,
        orient=not a.no_orient,
        asymmetric=a.asymmetric,
        fractional_zero=a.fractional_zero,
        col_scale=a.col_scale,
    )


def cmd_quantize(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    summary = quantize_model(
        a.src,
        a.out,
        _config(a),
        Options(skip=tuple(a.skip), include=tuple(a.include), target_bpw=a.target_bpw, fold=a.fold),
        workers=a.workers,
        device=a.device,
        executor=a.executor,
        overwrite=a.overwrite,
        allow_pickle=a.allow_pickle,
    )
    if a.target_bpw is not None:
        print(f"settings chosen for {a.target_bpw:g} bits/weight: {summary.settings_map()} (per layer: {SUMMARY})")
    print(f"{summary.line()} in {time.perf_counter() - t0:.1f} s")


def _methods_and_bits(a: argparse.Namespace) -> tuple[list[str], list[int]]:
    """``--methods`` and ``--bits``, checked before any model loads so that a typo costs nothing."""
    methods = a.methods.split(",") if a.methods else list(DEFAULT_METHODS)
    for name in methods:
        resolve(name)
    try:
        bits = [int(b) for b in a.bits.split(",")]
    except ValueError:
        raise EasyQuantError(f"--bits {a.bits!r}: expected comma-separated integers such as 4,3") from None
    for b in bits:
        QuantConfig(bits=b)  # names the allowed range
    return methods, bits


def _add_eval_args(p: argparse.ArgumentParser, out: Path | None) -> None:
    p.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: the offline SmolLM2-135M)")
    p.add_argument("--text", type=Path, default=None, help="evaluation text (default: offline news prose)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text for GPTQ (default: a separate news text)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048, GPTQ's)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows (default: all)")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument(
        "--gen-tokens", type=int, default=32, help="tokens generated to time packed models (default 32; 0: skip)"
    )
    p.add_argument(
        "--gen-dtype",
        choices=DTYPES,
        default="bfloat16",
        help="dtype the timed models generate in (default bfloat16: on a CPU, 4-bit weights then run through "
        "torch's int4 kernel; float32 dequantizes every weight at every step)",
    )
    p.add_argument("--out", type=Path, default=out, help="output folder" + (f" (default {out})" if out else ""))


def cmd_study(a: argparse.Namespace) -> None:
    from .checkpoint.targets import block_linears
    from .eval import assets, study
    from .eval.models import load_causal_lm

    a.out = a.out or Path(f"runs/study-{a.question}")
    if a.question == "encoder":
        cmd_encoder(a)
        return
    if a.question in ("nsigma", "ablation"):
        a.methods = ",".join(study.NSIGMA_METHODS if a.question == "nsigma" else study.ABLATION_METHODS)
        cmd_compare(a)
        return
    model_path = Path(a.model) if a.model else assets.smollm2_gguf()
    model, _ = load_causal_lm(model_path)
    linears = block_linears(model)
    note = source_note(model_path)
    if a.question == "outliers":
        title = f"{model_path.name}{note}: outliers at n-sigma {a.n_sigma:g} (per tensor)"
        print(title)
        print(study.outliers_report(linears, a.n_sigma, a.out, title))
    else:
        names = dict(linears)
        layer = a.layer or next(n for n in names if n.endswith("down_proj") or n.endswith("fc2"))
        if layer not in names:
            raise EasyQuantError(f"no quantizable linear layer named {layer!r} in {model_path}")
        bits = int(a.bits.split(",")[0])
        title = f"{model_path.name}{note}: {layer}, {bits}-bit, per channel, no outliers"
        print(title)
        print(study.range_report(names[layer].weight.data, bits, a.lr, a.steps, a.out, title))
    print(f"wrote {a.out}")


def cmd_encoder(a: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from transformers import AutoModel, AutoTokenizer

    from .eval import assets
    from .eval.encoder_eval import encoder_compare, encoder_markdown, sentences
    from .eval.evaluate import read_text, token_windows

    methods, bits = _methods_and_bits(a)
    folder = Path(a.model) if a.model else assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    sents = sentences(read_text(a.text or assets.news_text()))
    batch = tok(sents, return_tensors="pt", padding=True, truncation=True, max_length=128)
    calib = token_windows(tok, read_text(a.calib or assets.calibration_text()), 128, a.calib_windows)
    rows = encoder_compare(model, batch, calib, methods, bits)
    title = f"{folder.parent.name}/{folder.name} (fp32, never quantized): {len(sents)} sentences of the news text"
    table = encoder_markdown(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "encoder.md").write_text(f"{title}\n\n{table}\n")
    (a.out / "encoder.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(title)
    print(table)


def cmd_compare(a: argparse.Namespace) -> None:
    import datetime
    import platform

    import torch

    from .eval import assets
    from .eval.compare import compare, markdown, write_results
    from .eval.evaluate import read_text, token_windows
    from .eval.models import load_causal_lm

    methods, bits = _methods_and_bits(a)
    model_path = Path(a.model) if a.model else assets.smollm2_gguf()
    text, calib_text = a.text or assets.news_text(), a.calib or assets.calibration_text()
    model, tok = load_causal_lm(model_path)
    windows = token_windows(tok, read_text(text), a.window, a.max_windows)
    calib = token_windows(tok, read_text(calib_text), a.window, a.calib_windows)
    note = source_note(model_path)
    title = (
        f"{model_path.name}{note}; eval {Path(text).name}: {len(windows)} windows of {a.window} tokens; "
        f"GPTQ calibration {Path(calib_text).name}: {len(calib)} windows"
    )
    print(title)
    fp, rows = compare(
        model,
        windows,
        calib,
        methods,
        bits,
        on_row=lambda r: print(r, flush=True),
        gen_tokens=a.gen_tokens,
        gen_dtype=getattr(torch, a.gen_dtype),
    )
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "model": str(model_path),
        "text": str(text),
        "calibration": str(calib_text),
        "window": a.window,
        "gen_tokens": a.gen_tokens,
        "gen_dtype": a.gen_dtype,
    }
    write_results(a.out, fp, rows, meta, title)
    print(markdown(fp, rows))
    print(f"wrote {a.out / 'compare.md'}, compare.json and compare.png")


def cmd_export_gguf(a: argparse.Namespace) -> None:
    from .integrations.ggml_blocks import Q4_0, Q4_1, Q8_0
    from .integrations.gguf_export import export_gguf

    kind = {"auto": None, "q4_0": Q4_0, "q4_1": Q4_1, "q8_0": Q8_0}[a.type]
    report = export_gguf(
        a.ckpt, a.out, tokenizer_from=a.tokenizer_from, dense=a.dense, kind=kind, overwrite=a.overwrite
    )
    print(report.summary())


def cmd_export_ct(a: argparse.Namespace) -> None:
    from .integrations.ct_export import export_compressed_tensors

    print(export_compressed_tensors(a.ckpt, a.out, group_size=a.group_size, overwrite=a.overwrite).summary())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="easyquant", description="Data-free low-bit quantization of LLM weights (EasyQuant)."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face checkpoint (folder or .gguf) into OUT")
    q.add_argument("src", help="model folder (safetensors) or .gguf file")
    q.add_argument("out", help="output folder")
    _add_quant_args(q)
    q.add_argument(
        "--skip", action="append", default=[], metavar="PATTERN", help="modules to leave alone (glob or regex)"
    )
    q.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Linear modules outside the blocks to quantize too (e.g. lm_head)",
    )
    q.add_argument(
        "--target-bpw",
        type=float,
        default=None,
        metavar="BITS",
        help="choose bits (--bits -1, 0, +1), group size (--group-size, twice it) and outliers (kept or not) per "
        "layer within this many bits per weight over all quantized layers, from each layer's error "
        "(a data-free knapsack; quantizes each layer 12 times more to choose)",
    )
    q.add_argument(
        "--fold",
        choices=list(FOLD_MODES),
        default="rows",
        help="fold column scales into the model so that stored weights need no activation scaling: rows (default: "
        "v_proj -> o_proj, up_proj -> down_proj, and BERT's value -> output), all (also into the norms before "
        "q/k/v and gate/up, one scale shared by the linears that read a norm: every weight plain, GGUF and "
        "compressed-tensors exports exact but for outlier blocks; some KL lost), none (every column scale at run "
        "time); llama, mistral, qwen2, qwen3 and BERT; not with --target-bpw",
    )
    q.add_argument("--workers", type=int, default=1, help="parallel worker processes (CUDA: one per GPU)")
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    q.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local processes, or tasks on a Ray cluster (RAY_ADDRESS; needs the ray extra)",
    )
    q.add_argument(
        "--overwrite", action="store_true", help="replace the easyquant checkpoint or run in OUT (never other files)"
    )
    q.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (with weights_only=True)")
    q.set_defaults(fn=cmd_quantize)

    g = sub.add_parser(
        "export-gguf", help="write an easyquant checkpoint as a GGUF file llama.cpp runs (Q4_0/Q4_1/Q8_0)"
    )
    g.add_argument("ckpt", help="easyquant checkpoint folder")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument(
        "--tokenizer-from",
        metavar="GGUF",
        help="copy the tokenizer from a GGUF of the same model (needed for SentencePiece vocabularies)",
    )
    g.add_argument(
        "--dense", default="f16", choices=["f16", "f32", "q8_0"], help="tensors left unquantized (default f16)"
    )
    g.add_argument(
        "--type",
        default="auto",
        choices=["auto", "q4_0", "q4_1", "q8_0"],
        help="block type of the quantized linears (auto: Q4_0 up to 4 bits, Q4_1 for asymmetric weights, else "
        "Q8_0; q8_0 keeps outliers within Q8_0's rounding at 8.5 bits/weight)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.set_defaults(fn=cmd_export_gguf)

    ct = sub.add_parser(
        "export-ct",
        help="write an easyquant checkpoint as a compressed-tensors (pack-quantized) checkpoint: vLLM's GPU kernels",
    )
    ct.add_argument("ckpt", help="easyquant checkpoint folder")
    ct.add_argument("out", help="the folder to write")
    ct.add_argument(
        "--group-size", type=int, default=None, help="regroup every linear (default: each keeps its own groups)"
    )
    ct.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a checkpoint")
    ct.set_defaults(fn=cmd_export_ct)

    d = sub.add_parser("demo", help="quantize the offline SmolLM2-135M and show quality before and after")
    d.add_argument("--out", type=Path, default=Path("runs/smollm2-easyquant"))
    d.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")
    d.add_argument("--max-windows", type=int, default=40)
    _add_quant_args(d)
    d.set_defaults(fn=lambda a: __import__("easyquant.demo", fromlist=["run"]).run(a, _config(a)))

    c = sub.add_parser("compare", help="every method on the same model and text: one table, JSON and a plot")
    _add_eval_args(c, Path("runs/compare"))
    c.add_argument("--methods", default=None, help="comma-separated (default: " + ",".join(DEFAULT_METHODS) + ")")
    c.add_argument("--bits", default="4,3", help="comma-separated bit widths (default 4,3)")
    c.set_defaults(fn=cmd_compare)

    st = sub.add_parser("study", help="the paper's questions (nsigma, ablation, outliers, range) and the encoder check")
    st.add_argument("question", choices=["nsigma", "ablation", "outliers", "range", "encoder"])
    _add_eval_args(st, None)
    st.add_argument("--bits", default="4", help="comma-separated bit widths (default 4)")
    st.add_argument("--n-sigma", type=float, default=3.0, help="outliers: the threshold (default 3)")
    st.add_argument("--layer", default=None, help="range: the module (default: the first block's down projection)")
    st.add_argument("--lr", type=float, default=1e-3, help="range: Adam's learning rate (default 1e-3)")
    st.add_argument("--steps", type=int, default=500, help="range: Adam steps (default 500)")
    st.add_argument("--methods", default=None, help="encoder: comma-separated methods (default: as compare)")
    st.set_defaults(fn=cmd_study)

    a = ap.parse_args(argv)
    if not interactive():  # a log: transformers' own bars would be one long line of refreshes
        transformers.utils.logging.disable_progress_bar()
    try:
        a.fn(a)
    except EasyQuantError as e:
        print(f"easyquant: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
