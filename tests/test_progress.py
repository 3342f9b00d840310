"""Progress in a log (stderr not a terminal) is a few whole lines, not a line of carriage returns."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from conftest import tiny_model
from easyquant import progress


def test_lines_every_few_seconds_and_at_the_end(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not progress.interactive()
    t0 = time.perf_counter()
    for _ in progress.progress_bar(range(2000), desc="work", unit="item"):
        pass
    elapsed = time.perf_counter() - t0
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0].startswith("work: 0/2000 item") and lines[-1].startswith("work: 2000/2000 item")
    assert len(lines) <= 2 + elapsed / progress.LOG_EVERY + 1, lines  # start, end, one per interval


def test_bars_that_are_not_left_leave_nothing_behind(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress.progress_bar(range(3), desc="inner", leave=False):
        pass
    assert all(line.startswith("inner: ") for line in log.getvalue().splitlines())


def test_quantize_log_stays_short(tmp_path):
    """The command as run under nohup or in CI: stderr a pipe. Its log is a handful of lines."""
    tiny_model("llama", tmp_path / "src")
    run = subprocess.run(
        [sys.executable, "-m", "easyquant.cli", "quantize", str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr, run.stderr[:500]
    lines = run.stderr.splitlines()
    assert any(line.startswith("quantizing: 14/14 tensor") for line in lines), lines
    assert len(lines) < 10, lines
