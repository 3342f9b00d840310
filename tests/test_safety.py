"""Never lose a user's data, never read outside the model: the pipeline's guards, each shown
on real files (tiny random models saved by transformers)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import easyquant  # noqa: F401  (registers the loader)
from conftest import tiny_model
from easyquant import EasyQuantError, QuantConfig
from easyquant.checkpoint.pipeline import RECORD, WORK_DIR, Options, quantize_model


def tree(folder):
    """Every file under ``folder`` with a hash of its bytes: what "nothing was touched" means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# ---- 1. --overwrite never deletes the source or a folder it did not make ----


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_overlapping_the_source_is_refused(tmp_path, where):
    src = tmp_path / "models" / "m"
    tiny_model("llama", src)
    (tmp_path / "models" / "other.txt").write_text("a neighbour")
    out = {"same": src, "parent": tmp_path / "models", "inside": src / "q"}[where]
    before = tree(tmp_path)
    with pytest.raises(EasyQuantError, match="overlaps the source"):
        quantize_model(src, out, overwrite=True, progress=False)
    assert tree(tmp_path) == before


def test_cli_quantize_m_m_overwrite_keeps_the_model(tmp_path):
    src = tmp_path / "m"
    tiny_model("llama", src)
    before = tree(src)
    r = subprocess.run(
        [sys.executable, "-m", "easyquant.cli", "quantize", str(src), str(src), "--overwrite"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "overlaps the source" in r.stderr and "Traceback" not in r.stderr
    assert tree(src) == before


def test_overwrite_clears_an_unfinished_run_with_other_settings(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    quantize_model(src, tmp_path / "clean", progress=False)
    (out / WORK_DIR / "layers").mkdir(parents=True)
    (out / RECORD).write_text('{"settings": {"config": "older"}}')
    (out / WORK_DIR / "layers" / "stale.safetensors").write_bytes(b"stale")
    with pytest.raises(EasyQuantError, match="holds a checkpoint or run with other settings; pass --overwrite"):
        quantize_model(src, out, progress=False)
    quantize_model(src, out, overwrite=True, progress=False)
    assert tree(out) == tree(tmp_path / "clean")


# ---- 2. an index names only files in its own folder ----


@pytest.mark.parametrize("shard", ["/etc/hostname", "../outside.safetensors", "sub/../../outside.safetensors", 7, None])
def test_index_pointing_outside_the_folder_is_refused(tmp_path, shard):
    src = tmp_path / "src"
    model = tiny_model("qwen2", src)
    save_file({"x": torch.ones(2)}, tmp_path / "outside.safetensors")
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="50KB")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(EasyQuantError, match=r"model\.safetensors\.index\.json: tensor 'model\.norm\.weight' maps to"):
        quantize_model(src, tmp_path / "o", progress=False)


# ---- 3. and 4. tied weights: pickle input, --include of a tied head ----


def test_pickle_source_with_tied_weights(tmp_path):
    src = tmp_path / "src"
    model = tiny_model("gemma", src)  # Gemma ties lm_head to the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    quantize_model(src, tmp_path / "from-pickle", QuantConfig(group_size=32), allow_pickle=True, progress=False)
    model.save_pretrained(tmp_path / "st")
    quantize_model(tmp_path / "st", tmp_path / "from-st", QuantConfig(group_size=32), progress=False)
    a = load_file(tmp_path / "from-pickle" / "model.safetensors")
    b = load_file(tmp_path / "from-st" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from-pickle")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_include_of_a_tied_head_says_so(tmp_path):
    src = tmp_path / "src"
    tiny_model("gemma", src)
    with pytest.raises(EasyQuantError, match=r"--include selects lm_head, whose weight is tied to model\.embed_tokens"):
        quantize_model(src, tmp_path / "o", options=Options(include=("lm_head",)), progress=False)


@pytest.mark.parametrize("flag", ["skip", "include"])
def test_pattern_matching_nothing_is_refused(tmp_path, flag):
    src = tmp_path / "src"
    tiny_model("llama", src)
    with pytest.raises(EasyQuantError, match=rf"--{flag} '\*\.mlp\.down_prj' matches no linear layer"):
        quantize_model(src, tmp_path / "o", options=Options(**{flag: ("*.mlp.down_prj",)}), progress=False)


# ---- 5. only what a loader needs is copied ----


def test_only_loader_files_are_copied(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    others = ["tf_model.h5", "flax_model.msgpack", "model.onnx", "training_args.pt", "optimizer.bin"]
    for name in others:
        (src / name).write_bytes(b"\0" * 4096)
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.json").write_text("{}")
    (src / "modules.json").write_text(json.dumps([{"path": "../outside"}, {"path": "/etc"}]))
    summary = quantize_model(src, out, progress=False)
    names = {p.name for p in out.iterdir()}
    assert not names & set(others) and not (out / "outside").exists() and "modules.json" in names
    assert {"tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json"} <= names
    assert sorted(summary.left_out) == sorted(others) and "not copied: " in summary.line()


# ---- 6. resuming after the source changed is refused ----


def _poison(src, key):
    state = load_file(src / "model.safetensors")
    clean = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return state, clean


def test_resume_after_the_source_changed_is_refused(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    unfolded = Options(fold="none")  # a fold reads every weight up front: no tensor would be done before the NaN
    quantize_model(src, tmp_path / "clean", options=unfolded, progress=False)
    key = "model.layers.1.self_attn.q_proj.weight"  # late in the order: earlier tensors get done first
    state, clean = _poison(src, key)
    with pytest.raises(EasyQuantError, match=r"q_proj\.weight: weight holds 1 NaN"):
        quantize_model(src, out, options=unfolded, progress=False)
    assert list((out / WORK_DIR / "layers").glob("*.safetensors")), "some tensors were done before the failure"
    state[key] = clean  # the user fixes the file: a new file, same name
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EasyQuantError, match="holds a run of a source that has changed since"):
        quantize_model(src, out, options=unfolded, progress=False)
    quantize_model(src, out, options=unfolded, overwrite=True, progress=False)
    checkpoint = {k: v for k, v in tree(out).items() if k != RECORD}  # the record holds the new fingerprint
    assert checkpoint == {k: v for k, v in tree(tmp_path / "clean").items() if k != RECORD}


# ---- 8. one run per output folder; a failing tensor stops the run at once ----


def test_second_run_on_the_same_output_is_refused(tmp_path):
    from easyquant.checkpoint.outdir import locked

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    with locked(out), pytest.raises(EasyQuantError, match="another easyquant run is writing"):
        quantize_model(src, out, progress=False)
    quantize_model(src, out, progress=False)  # the lock went with the first holder


def test_failing_tensor_stops_the_pool_at_once(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", src)
    _poison(src, "model.layers.0.mlp.down_proj.weight")  # the first of 14 in the order of work
    with pytest.raises(EasyQuantError, match=r"down_proj\.weight: weight holds 1 NaN"):
        quantize_model(src, out, workers=2, progress=False)
    done = list((out / WORK_DIR / "layers").glob("*.safetensors"))
    assert len(done) < 8, f"{len(done)} of 13 good tensors were still quantized after the failure"


# ---- 11. kill -9 at random points, then resume ----


def test_kill_reduced_form(tmp_path):
    """bench/kill.py at 4 points (the full 20-point run is in RESULTS.md): a real CLI process
    killed with SIGKILL; every resume is bit-identical, no unfinished folder loads."""
    from pathlib import Path

    out = tmp_path / "kill.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/kill.py", "--points", "4", "--seed", "3", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] == 4 and all(r["resumed_identical"] and r["loads_only_if_complete"] for r in result["rows"])
