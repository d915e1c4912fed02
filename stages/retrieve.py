"""`gedistill retrieve`: the baseline student's top-K candidates for each teacher sample."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pipeline.data.candidates import select_samples, top_k, write_candidates
from pipeline.student.checkpoint import load_student
from pipeline.errors import UsageError
from pipeline.data.prepared import load_prepared
from pipeline.store import sha256_file
from stages.outputs import ensure_writable, set_threads, writing

log = logging.getLogger(__name__)


def retrieve(
    prepared: Annotated[Path, typer.Option(help="Folder written by `gedistill prepare`.")] = Path("data/prepared"),
    student: Annotated[Path, typer.Option(help="Baseline checkpoint folder (the retriever).")] = Path("data/students/baseline"),
    out: Annotated[Path, typer.Option(help="Candidates Parquet file.")] = Path("data/candidates/candidates.parquet"),
    k: Annotated[int, typer.Option(min=2, max=26, help="Candidates per sample (letters A.. identify them).")] = 20,
    samples_per_user: Annotated[int, typer.Option(min=1, help="Teacher samples per user: the last M training positions.")] = 1,
    all_positions: Annotated[bool, typer.Option(help="Use every training position (overrides --samples-per-user).")] = False,
    skip_last: Annotated[int, typer.Option(min=0, help="Skip each user's last L training positions, e.g. to add a second, disjoint teacher store.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default.")] = 0,
) -> None:
    """Pick teacher samples (training prefixes) and retrieve K unseen candidates for each with the baseline."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the candidates file's path, e.g. {out / 'candidates.parquet'}")
    set_threads(threads)
    data = load_prepared(prepared)
    ensure_writable(out.parent)
    model, meta = load_student(student)
    if meta.get("prepared_fingerprint") != data.fingerprint:
        raise UsageError(f"{student} was trained on other prepared data than {prepared}; "
                         f"retrain it with `gedistill student-train --prepared {prepared}`")
    per_user = None if all_positions else samples_per_user
    users, positions = select_samples(data.train, per_user, skip_last)
    histories = [data.train[u][:p] for u, p in zip(users, positions)]
    targets = np.array([data.train[u][p] for u, p in zip(users, positions)], dtype=np.int32)
    cands, scores = top_k(model, histories, k)
    recall = float((cands == targets[:, None]).any(1).mean())
    meta = {
        "prepared_fingerprint": data.fingerprint, "retriever": str(student),
        "retriever_sha256": sha256_file(student / "model.safetensors"),
        "selection": ("all" if per_user is None else f"last {per_user} per user")
        + (f", skipping the last {skip_last}" if skip_last else ""),
    }
    with writing(out):
        fp = write_candidates(out, users, positions, targets, cands, scores, meta)
    typer.echo(f"{len(users):,} samples, K={k}, target among candidates for {recall:.1%}; wrote {out} "
               f"(fingerprint {fp[:16]})")
