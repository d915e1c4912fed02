"""Helpers every stage uses for its outputs and threads. Kept apart from the stages themselves, so that a
stage's code dependencies (dvc.yaml deps, derived from its imports) do not pull in another stage's code."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from pipeline.errors import UsageError


def set_threads(threads: int) -> None:
    """0 keeps torch's default. On a shared machine, spin-waiting threads fight (DESIGN.md point 11)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def ensure_writable(*paths: Path) -> None:
    """Refuse an output folder that cannot be created or written, before hours of work end in a failed
    write. Creates nothing: the nearest existing folder must be a writable directory (access(2) also
    reports a read-only file system)."""
    for folder in paths:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise UsageError(f"{probe} is a file, but {folder} must be a folder; choose another output path")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {probe} (read-only or no permission); choose a writable output path")


def write_text_atomic(path: Path, text: str) -> None:
    """A file either whole or absent: a full disk never leaves a truncated metrics file that looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn a failed write of our own outputs (polars wraps the OS error in its own) into a usage error."""
    try:
        yield
    except (OSError, pl.exceptions.PolarsError) as e:
        raise UsageError(f"could not write {what} ({e}); free some space or choose another output path") from e
