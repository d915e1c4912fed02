"""The prepared-data store: sequences.parquet, items.parquet and summary.json, with a content fingerprint."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import UsageError
from pipeline.store import sha256_file

SEQUENCES, ITEMS, SUMMARY = "sequences.parquet", "items.parquet", "summary.json"


@dataclass(frozen=True)
class Prepared:
    user_ids: list[str]
    train: list[np.ndarray]  # per user, chronological internal item ids (1..n_items)
    valid: np.ndarray  # [U] int64
    test: np.ndarray  # [U] int64
    items: pl.DataFrame  # item_idx, item_id, title, text
    n_items: int
    fingerprint: str

    @property
    def n_users(self) -> int:
        return len(self.train)


def fingerprint(seqs: pl.DataFrame, items: pl.DataFrame) -> str:
    """sha256 over the content (ids, sequences, targets, texts), independent of Parquet encoding."""
    h = hashlib.sha256(b"gedistill-prepared-v1")
    train = seqs["train"]
    h.update(train.list.len().to_numpy().astype("<i8").tobytes())
    h.update(train.explode().drop_nulls().to_numpy().astype("<i8").tobytes())
    for col in ("valid", "test"):
        h.update(seqs[col].to_numpy().astype("<i8").tobytes())
    for col in (seqs["user_id"], items["item_id"], items["title"], items["text"]):
        h.update("\x1f".join(col.to_list()).encode())
    return h.hexdigest()


def _length_stats(lengths: np.ndarray) -> dict:
    return {
        "min": int(lengths.min()), "median": float(np.median(lengths)), "mean": float(lengths.mean()),
        "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max()),
    }


def file_identity(path: Path) -> dict:
    """What names an input file on every machine: its name and sha256, and for a file shipped inside an
    installed package (the embedded MovieLens in recbole's wheel) the package==version and the path inside
    it. Never the absolute path: it differs between machines and checkouts, so an output that records it
    hashes differently for identical data and defeats DVC's shared cache."""
    path = Path(path)
    ident = {"name": path.name, "sha256": sha256_file(path)}
    parts = path.resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in ("site-packages", "dist-packages"):
            top = parts[i + 1]
            dists = importlib.metadata.packages_distributions().get(top, [])
            if dists:
                dist = dists[0]
                ident = {"package": f"{dist}=={importlib.metadata.version(dist)}",
                         "name": "/".join(parts[i + 1:]), "sha256": ident["sha256"]}
            break
    return ident


def _host_neutral(extra: dict) -> dict:
    """`extra` with each `*_file` entry (`interactions_file`) replaced by the file's identity (name, sha256,
    package==version): summary.json is a DVC output and must hash the same on every machine, so it
    records no absolute path. Only `*_file` keys: a dataset name that happens to match a file stays text."""
    return {key: file_identity(Path(value)) if key.endswith("_file") and isinstance(value, (str, Path))
            and Path(value).is_file() else value for key, value in extra.items()}


def write_prepared(out: Path, seqs: pl.DataFrame, items: pl.DataFrame, extra: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    extra = _host_neutral(extra)
    seqs = seqs.with_columns(
        pl.col("user_idx").cast(pl.Int32), pl.col("train").cast(pl.List(pl.Int32)),
        pl.col("valid").cast(pl.Int32), pl.col("test").cast(pl.Int32),
    )
    items = items.with_columns(pl.col("item_idx").cast(pl.Int32))
    full_len = seqs["train"].list.len().to_numpy() + 2
    summary = {
        "users": seqs.height,
        "items": items.height,
        "interactions": int(full_len.sum()),
        "sequence_length": _length_stats(full_len),
        "train_length": _length_stats(full_len - 2),
        "split": "leave-one-out: last item test, second-to-last validation, the rest train",
        "order": "timestamp ascending, ties in file order",
        "fingerprint": fingerprint(seqs, items),
        **extra,
    }
    # Write to temporary names, then rename: a killed run never leaves a half-written store.
    for name, df in ((SEQUENCES, seqs), (ITEMS, items)):
        tmp = out / f".{name}.tmp"
        df.write_parquet(tmp, compression="zstd")
        os.replace(tmp, out / name)
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / SUMMARY)
    return summary


def load_prepared(folder: Path) -> Prepared:
    folder = Path(folder)
    paths = [folder / n for n in (SEQUENCES, ITEMS, SUMMARY)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"{folder}: missing {', '.join(missing)}; run `gedistill prepare --out {folder}` first")
    try:
        seqs = pl.read_parquet(paths[0])
        items = pl.read_parquet(paths[1])
        summary = json.loads(paths[2].read_text())
    except (pl.exceptions.PolarsError, OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder}: prepared data is unreadable ({e}); rerun `gedistill prepare`") from e
    need = {"user_idx", "user_id", "train", "valid", "test"}
    if not need <= set(seqs.columns):
        raise UsageError(f"{paths[0]}: expected columns {sorted(need)}; rerun `gedistill prepare`")
    fp = fingerprint(seqs, items)
    if fp != summary.get("fingerprint"):
        raise UsageError(f"{folder}: content does not match summary.json's fingerprint; rerun `gedistill prepare`")
    return Prepared(
        user_ids=seqs["user_id"].to_list(),
        train=[np.asarray(t, dtype=np.int64) for t in seqs["train"].to_list()],
        valid=seqs["valid"].to_numpy().astype(np.int64),
        test=seqs["test"].to_numpy().astype(np.int64),
        items=items,
        n_items=items.height,
        fingerprint=fp,
    )
