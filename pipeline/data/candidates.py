"""Teacher samples and their candidate sets: which prefixes the teacher sees, and the retriever's top-K."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import UsageError
from pipeline.student.sasrec import SASRec
from pipeline.data.sequences import left_pad

META_KEY = b"gedistill.candidates"


def select_samples(train: list[np.ndarray], per_user: int | None, skip_last: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx, position) of each teacher sample: the last `per_user` training positions of each user
    (None = all) before the last `skip_last` ones, where position p means history train[:p] and
    target train[p]; p >= 1. `skip_last` lets a second store extend a first one without overlap."""
    users, positions = [], []
    for u, t in enumerate(train):
        end = max(1, len(t) - skip_last)
        first = 1 if per_user is None else max(1, end - per_user)
        ps = np.arange(first, end)
        users.append(np.full(len(ps), u))
        positions.append(ps)
    return np.concatenate(users).astype(np.int32), np.concatenate(positions).astype(np.int32)


@torch.no_grad()
def top_k(model: SASRec, histories: list[np.ndarray], k: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per history by the model's score, excluding every item already in the history."""
    if k > model.config.n_items - 1:
        raise UsageError(f"K={k} candidates but only {model.config.n_items} items; lower --k")
    model.eval()
    items, scores = [], []
    for i in range(0, len(histories), batch):
        hs = histories[i:i + batch]
        s = model.score_all(model.user_embedding(left_pad(hs, model.config.max_len)))
        s.scatter_(1, left_pad(hs, max(len(h) for h in hs)), float("-inf"))
        v, ix = s.topk(k, dim=1)
        if torch.isinf(v).any():
            raise UsageError("a history covers nearly every item, so fewer than K unseen candidates remain; lower --k")
        items.append(ix.numpy().astype(np.int32))
        scores.append(v.numpy().astype(np.float32))
    return np.concatenate(items), np.concatenate(scores)


def content_hash(table: pa.Table) -> str:
    h = hashlib.sha256(b"gedistill-candidates-v1")
    for name in ("sample_id", "user_idx", "position", "target"):
        h.update(table[name].to_numpy().astype("<i8").tobytes())
    h.update(table["candidates"].combine_chunks().flatten().to_numpy().astype("<i8").tobytes())
    return h.hexdigest()


def write_candidates(path: Path, user_idx: np.ndarray, position: np.ndarray, target: np.ndarray,
                     cands: np.ndarray, scores: np.ndarray, meta: dict) -> str:
    k = cands.shape[1]
    table = pa.table({
        "sample_id": pa.array(np.arange(len(user_idx), dtype=np.int64)),
        "user_idx": pa.array(user_idx, pa.int32()),
        "position": pa.array(position, pa.int32()),
        "target": pa.array(target.astype(np.int32), pa.int32()),
        "candidates": pa.FixedSizeListArray.from_arrays(pa.array(cands.reshape(-1), pa.int32()), k),
        "retriever_scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1), pa.float32()), k),
    })
    fp = content_hash(table)
    meta = {**meta, "k": k, "samples": len(user_idx), "fingerprint": fp}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return fp


def read_candidates(path: Path) -> tuple[pl.DataFrame, dict]:
    """The candidates frame and its metadata (prepared fingerprint, K, selection, own fingerprint)."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no candidates file; run `gedistill retrieve` first")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[META_KEY])
    except (pa.ArrowInvalid, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a gedistill candidates file ({e}); rerun `gedistill retrieve`") from e
    if content_hash(table) != meta.get("fingerprint"):
        raise UsageError(f"{path}: content does not match its recorded fingerprint; rerun `gedistill retrieve`")
    return pl.from_arrow(table), meta


def candidates_fingerprint(path: Path) -> str:
    return read_candidates(path)[1]["fingerprint"]
