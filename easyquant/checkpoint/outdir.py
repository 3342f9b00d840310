"""The output folder, kept safe: never the source or around it, one run at a time (a lock), a
record of each run's settings so that the same command resumes and other settings are
refused, and nothing deleted that is not easyquant's own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import EasyQuantError
from .st_io import atomic_write_json, fsync_dir, remove_stale_temps

WORK_DIR = ".easyquant-work"
RECORD = ".easyquant-run.json"


def refuse_overlap(src: Path, out: Path) -> None:
    """OUT may be neither the source, nor a folder holding it, nor a folder inside it."""
    src, out = src.resolve(), out.resolve()
    if out == src or out in src.parents or (src.is_dir() and src in out.parents):
        raise EasyQuantError(
            f"output {out} overlaps the source {src} (the same path, inside it, or holding it); "
            "choose an output folder apart from the model"
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``out`` (created if needed): a second run on the
    same OUT is refused rather than left to clobber this one's files."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EasyQuantError(f"{out}: another easyquant run is writing this folder; wait for it to end") from None
        yield
    finally:
        os.close(fd)


def _is_easyquant_checkpoint(out: Path) -> bool:
    try:
        qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "easyquant"


def _clear(out: Path) -> None:
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    fsync_dir(out)


def _read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # damaged: ours, but matches no run
    return record if isinstance(record, dict) else {}


def prepare_out(out: Path, settings: dict, overwrite: bool) -> dict:
    """Make ``out`` ready for this run (the caller holds its lock) and return its record: new,
    resumed (the same settings and source, no ``overwrite``), or new after clearing the
    easyquant checkpoint or run that ``overwrite`` replaces."""
    remove_stale_temps(out)
    contents = {p.name for p in out.iterdir()}
    record = _read_record(out)
    if record is not None and (overwrite or record.get("settings") != settings):
        if not overwrite:
            previous = record.get("settings") or {}
            same_run = {k: v for k, v in previous.items() if k != "source"} == {
                k: v for k, v in settings.items() if k != "source"
            }
            why = (
                "a run of a source that has changed since (files edited or re-downloaded)"
                if same_run
                else "a checkpoint or run with other settings"
            )
            raise EasyQuantError(f"{out} holds {why}; pass --overwrite to replace it")
        _clear(out)
    elif record is None and contents and contents != {WORK_DIR}:
        if not _is_easyquant_checkpoint(out):
            raise EasyQuantError(
                f"{out} already holds files that are not an easyquant checkpoint; choose an empty folder"
                + (" (--overwrite deletes only easyquant output)" if overwrite else "")
            )
        if not overwrite:
            raise EasyQuantError(f"{out} already holds an easyquant checkpoint; pass --overwrite to replace it")
        _clear(out)
    elif record is None:  # empty, or a work folder left before the record existed
        _clear(out)
    if not (out / RECORD).is_file():
        record = {"settings": settings}
        atomic_write_json(out / RECORD, record)
    return record
