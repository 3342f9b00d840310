"""Kill test: ``easyquant quantize`` killed with SIGKILL at random points, then resumed.

A tiny Llama (random weights, 4 layers) is quantized once without interruption. Then, for
each point, a real ``easyquant quantize`` process (the CLI's ``main``, one or two workers,
forked from a parent that made the imports once) is started on a fresh output folder and
killed with ``kill -9`` after a random delay,
stratified over the uninterrupted run's duration (point i of n falls in the i-th n-th of it),
so that every phase is hit: startup, quantizing, writing shards, finishing. At each point:

- if ``from_pretrained`` loads the folder left behind, its files must be the complete
  checkpoint, byte for byte (a folder that looks finished must be finished);
- a kill after the checkpoint was complete (the process was on its way out) leaves a
  folder the same command recognises as complete;
- the same command run again must finish with a checkpoint bit-identical to the
  uninterrupted one, work folder and temporary files gone.

    python bench/kill.py [--points 20] [--seed 0] [--json bench/results/kill.json]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transformers
from workloads import quiet_transformers, save_random_llama, trial_args, trial_meta

ROOT = Path(__file__).resolve().parents[1]
# One process imports easyquant once, then forks a fresh ``easyquant quantize`` per run (its
# stdout and stderr to a file, not the pipe): each run is a real process of its own, in the state
# a new CLI process reaches after its imports, without paying for them ten times over. Per line
# of JSON arguments it prints the run's pid, then, once it has ended (or been killed), its exit code.
ZYGOTE = """
import json, os, sys
import easyquant.cli
print('ready', flush=True)
for line in sys.stdin:
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = easyquant.cli.main(['quantize', *args])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


class Runner:
    """The forking parent (``ZYGOTE``): ``start`` a quantize run, ``wait`` for its exit code."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, src: Path, out: Path, workers: int) -> int:
        args = [str(src), str(out), "--group-size", "32", "--workers", str(workers)]
        self.proc.stdin.write(json.dumps([args, str(self.log)]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def timed_run(runner: Runner, src: Path, out: Path, workers: int) -> float:
    """Seconds from the start of a run until the checkpoint is complete (config.json written)
    plus a tenth, so that some points fall while the process is on its way out."""
    runner.start(src, out, workers)
    t0 = time.perf_counter()
    while not (out / "config.json").exists():
        time.sleep(0.005)
    done = time.perf_counter() - t0
    assert runner.wait() == 0, f"the uninterrupted run failed ({out}): {runner.log.read_text()[-300:]}"
    return 1.1 * done


def loads_as_complete(out: Path) -> bool:
    import easyquant  # noqa: F401

    try:
        transformers.AutoModelForCausalLM.from_pretrained(out)
    except Exception:
        return False
    return True


def run(points: int, seed: int) -> dict:
    quiet_transformers()
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_random_llama(tmp / "src", vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          max_position_embeddings=64)  # fmt: skip
        runner = Runner(tmp / "run.log")
        durations = {w: timed_run(runner, tmp / "src", tmp / f"clean-{w}", w) for w in (1, 2)}
        clean = tree(tmp / "clean-1")
        checkpoint = {k: v for k, v in clean.items() if not k.startswith(".")}  # without the run record
        assert tree(tmp / "clean-2") == clean, "worker count changed the checkpoint"
        for i in range(points):
            workers = 1 + i % 2
            out = tmp / "out"
            shutil.rmtree(out, ignore_errors=True)
            pid = runner.start(tmp / "src", out, workers)
            delay = (i + rng.random()) / points * durations[workers]
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):  # it may have finished (and been reaped) first
                os.kill(pid, signal.SIGKILL)
            finished_first = runner.wait() == 0
            left = tree(out) if out.exists() else {}
            looks_complete = out.exists() and loads_as_complete(out)
            complete = {k: v for k, v in left.items() if not k.startswith(".")} == checkpoint
            runner.start(tmp / "src", out, workers)
            identical = runner.wait() == 0 and tree(out) == clean
            units = sum(k.startswith(".easyquant-work/layers/") for k in left)
            rows.append({"point": i, "workers": workers, "delay_s": round(delay, 3),
                         "share_of_run": round(delay / durations[workers], 3), "finished_before_kill": finished_first,
                         "files_left": len(left), "units_done": units,
                         "loads": looks_complete, "loads_only_if_complete": complete or not looks_complete,
                         "resumed_identical": identical,
                         "resume_error": "" if identical else runner.log.read_text()[-300:]})  # fmt: skip
            print(f"point {i}: {rows[-1]}", file=sys.stderr, flush=True)
        runner.close()
    ok = sum(r["resumed_identical"] and r["loads_only_if_complete"] for r in rows)
    return {"points": points, "seed": seed, "ok": ok, "durations_s": durations, "rows": rows}


def main() -> None:
    a = trial_args(__doc__, "points", 20)
    result = run(a.points, a.seed)
    result["meta"], heading = trial_meta()
    d = result["durations_s"]
    print(f"# Kill test: {result['ok']}/{a.points} points resumed bit-identical, none loadable unless complete\n")
    print(f"{heading}\n")
    print(f"Kill window (after the imports, to the checkpoint's completion + 10%): {d[1]:.2f} s with one worker, "
          f"{d[2]:.2f} s with two.\n")  # fmt: skip
    print("| point | workers | killed at | units done | files left | loads | resumed identical |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['point']} | {r['workers']} | {r['share_of_run']:.0%} | {r['units_done']} | {r['files_left']} | "
              f"{'yes' if r['loads'] else 'no'} | {'yes' if r['resumed_identical'] else 'NO'} |")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if result["ok"] == a.points else 1)


if __name__ == "__main__":
    main()
