"""Progress that reads well wherever it lands: tqdm's bars on a terminal; anywhere else (CI,
``nohup``, a log file) a plain line every few seconds and one at the end, instead of every
refresh joined by carriage returns into one endless line."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOG_EVERY = 5.0  # seconds between lines when stderr is not a terminal
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # cursor moves and returns: a terminal's, not a log's


def interactive() -> bool:
    """Whether progress goes to a terminal (bars) rather than a log (lines)."""
    return sys.stderr.isatty()


class _Lines:
    """A stream for tqdm that keeps only whole status lines: each refresh becomes one line, and
    the blanking a closing bar writes, nothing."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; elsewhere the same counts as a line every
    ``LOG_EVERY`` seconds (and at the end, for bars that are left)."""
    if interactive():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]")
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=LOG_EVERY, maxinterval=LOG_EVERY, **kwargs)
