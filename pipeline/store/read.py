"""Reading a teacher store: open a complete store (verified first) and stream its record batches.

Imported by stage two through pipeline.store: no LLM imports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.store.check import verify_store
from pipeline.store.format import MANIFEST, SCHEMA_VERSION


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    manifest: dict[str, Any] = field(hash=False)
    shard_paths: tuple[Path, ...]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def n_rows(self) -> int:
        return self.manifest["n_samples"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    @property
    def k(self) -> int:
        return self.manifest["settings"]["k"]


def open_store(root: Path, checksums: bool = True, prepared: Any = None) -> StoreInfo:
    """Load the manifest of a complete store. checksums=True (what training and evaluation use): the whole
    store is verified first, streaming (store.check.verify_store: manifest, schema, sha256, sample ids,
    rankings), and any problem refuses it, naming the file. prepared (a Prepared): also check that the
    store was made from it, row by row."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.exists():
        raise UsageError(f"{root} is not a teacher store (no {MANIFEST}); run `gedistill teacher-dump --out {root}`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        shards = [s["name"] for s in manifest["shards"]]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{mpath} is unreadable or not a store manifest ({type(e).__name__}: {e}); rerun "
                         f"`gedistill teacher-dump` with the same options to rebuild it") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{root}: store schema version {manifest.get('schema_version')}, this gedistill reads {SCHEMA_VERSION}")
    if not manifest.get("complete"):
        raise UsageError(f"{root}: incomplete store ({len(shards)} of {manifest.get('n_shards')} shards); rerun teacher-dump to finish it")
    if checksums:
        problems = verify_store(root, prepared)
        if problems:
            raise UsageError(f"{root} fails verification, refusing to use it ({len(problems)} problem(s)): "
                             + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
                             + f". See `gedistill cache verify {root}`; rerun teacher-dump with the same options "
                             "to recompute bad shards.")
    paths = []
    for name in shards:
        p = root / name
        if not p.exists():
            raise UsageError(f"{root}: shard {name} is missing")
        paths.append(p)
    return StoreInfo(root, manifest, tuple(paths))


def iter_batches(store: Path | StoreInfo, columns: list[str] | None = None, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream record batches in sample order, one row group at a time (memory bounded by `batch_rows`)."""
    info = store if isinstance(store, StoreInfo) else open_store(store, checksums=False)
    for p in info.shard_paths:
        yield from pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=columns)

