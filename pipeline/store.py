"""The teacher store: Parquet shards + manifest.json, written by stage one and read by stage two.

Layout: `part-00003-of-00016.parquet` (zstd), each a contiguous slice of the sample list, written
under a temporary name and renamed when complete; `manifest.json` holds the schema version, the
fingerprinted settings, and per shard its row count and sha256. Each shard carries the same facts
in its Parquet key-value metadata (key `gedistill`), so a shard is self-describing.

This module is imported by stage two: it must never import torch-for-LLMs, transformers or vllm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
META_KEY = b"gedistill"
H_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def shard_name(index: int, n_shards: int) -> str:
    return f"part-{index:05d}-of-{n_shards:05d}.parquet"


def store_schema(hidden_size: int, h_dec_dtype: str = "float16") -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.int64()),
        ("user_idx", pa.int32()),
        ("position", pa.int32()),
        ("target", pa.int32()),
        ("candidates", pa.list_(pa.int32())),  # in the order shown to the teacher
        ("ranking", pa.list_(pa.int16())),  # permutation of 0..K-1, best first, indices into candidates
        ("scores", pa.list_(pa.float32())),  # identifier logits at the decision step, candidates order
        ("h_dec", pa.list_(H_DTYPES[h_dec_dtype], hidden_size)),
        ("status", pa.string()),  # ok | repaired | failed
        ("prompt_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("prompt", pa.string()),
        ("generated", pa.string()),
    ])


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. `mode: stored 'generate', now 'first-token'`."""
    a, b = _flatten(stored), _flatten(current)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            sa, sb = (repr(x)[:60] + ("..." if len(repr(x)) > 60 else "") for x in (a.get(key), b.get(key)))
            out.append(f"{key}: stored {sa}, now {sb}")
    return out


@dataclass(frozen=True)
class StoreSpec:
    """What a store is: the fingerprinted settings plus its layout."""

    settings: dict[str, Any] = field(hash=False)
    n_samples: int
    shard_rows: int
    hidden_size: int
    h_dec_dtype: str = "float16"

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.settings)

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_samples // self.shard_rows))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.n_samples)

    def shard_meta(self, index: int) -> dict[str, Any]:
        start, stop = self.shard_range(index)
        return {"schema_version": SCHEMA_VERSION, "fingerprint": self.fingerprint, "settings": self.settings,
                "shard": index, "n_shards": self.n_shards, "start": start, "stop": stop,
                "hidden_size": self.hidden_size, "h_dec_dtype": self.h_dec_dtype}


def read_shard_meta(path: Path) -> dict[str, Any]:
    md = pq.read_metadata(path).metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path.name}: no gedistill key-value metadata")
    return json.loads(md[META_KEY])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class StoreWriter:
    """Writes one store directory; resumable (complete shards are kept) and idempotent."""

    def __init__(self, root: Path, spec: StoreSpec, replace_mismatched: bool = False) -> None:
        """replace_mismatched: a store made with other settings is deleted (with a warning naming the
        differences) instead of refused; for pipelines that keep older outputs elsewhere (DVC's cache)."""
        self.root, self.spec = Path(root), spec
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_compatible(replace_mismatched)
        if not (self.root / MANIFEST).exists():
            self.write_manifest()

    def _check_compatible(self, replace_mismatched: bool = False) -> None:
        stored: dict[str, Any] | None = None
        if (self.root / MANIFEST).exists():
            stored = json.loads((self.root / MANIFEST).read_text())
        else:
            shards = sorted(self.root.glob("part-*.parquet"))
            if shards:
                stored = read_shard_meta(shards[0])
        if stored is None or stored.get("fingerprint") == self.spec.fingerprint:
            return
        diffs = diff_settings(stored.get("settings", {}), self.spec.settings)
        layout = [f"{k}: stored {stored.get(k)}, now {getattr(self.spec, k)}" for k in ("n_samples", "shard_rows")
                  if k in stored and stored[k] != getattr(self.spec, k)]
        what = "; ".join(diffs + layout or ["(fingerprint only)"])
        if replace_mismatched:
            self._clear(what)
            return
        raise UsageError(
            f"{self.root} holds a teacher store made with other settings; refusing to mix them. Differences: "
            + what + ". Use another --out directory, delete this one, or pass --replace-mismatched."
        )

    def _clear(self, why: str) -> None:
        """Delete a mismatched store; only when the directory holds nothing but store files."""
        owned = [p for p in self.root.iterdir()
                 if p.is_file() and (p.name == MANIFEST or p.name.startswith("part-") and p.suffix == ".parquet"
                                     or p.name.startswith(".") and ".tmp-" in p.name)]
        foreign = sorted(p.name for p in self.root.iterdir() if p not in owned)
        if foreign:
            raise UsageError(f"{self.root} holds a teacher store made with other settings and also other files "
                             f"({', '.join(foreign[:5])}); not deleting it. Use another --out directory.")
        log.warning("%s: replacing a teacher store made with other settings (%s)", self.root, why)
        for p in owned:
            p.unlink(missing_ok=True)  # another worker on this directory may have removed it already

    def path(self, index: int) -> Path:
        return self.root / shard_name(index, self.spec.n_shards)

    def shard_ok(self, index: int) -> bool:
        """A final-named shard with this fingerprint and the expected rows (the sha256 when known)."""
        path = self.path(index)
        if not path.exists():
            return False
        try:
            meta = read_shard_meta(path)
            rows = pq.read_metadata(path).num_rows
        except Exception as e:  # unreadable footer: a torn or corrupted file
            log.warning("shard %s is unreadable (%s); it will be recomputed", path.name, e)
            return False
        start, stop = self.spec.shard_range(index)
        if meta.get("fingerprint") != self.spec.fingerprint or rows != stop - start:
            log.warning("shard %s does not match this run; it will be recomputed", path.name)
            return False
        known = {s["name"]: s["sha256"] for s in self.read_manifest().get("shards", [])}
        if path.name in known and known[path.name] != sha256_file(path):
            log.warning("shard %s fails its checksum; it will be recomputed", path.name)
            return False
        return True

    def pending(self, num_workers: int = 1, worker_index: int = 0) -> list[int]:
        if not 0 <= worker_index < num_workers:
            raise UsageError(f"--worker-index must be in 0..{num_workers - 1}, got {worker_index}")
        mine = range(worker_index, self.spec.n_shards, num_workers)
        return [i for i in mine if not self.shard_ok(i)]

    def write_shard(self, index: int, table: pa.Table) -> Path:
        start, stop = self.spec.shard_range(index)
        if table.num_rows != stop - start:
            raise ValueError(f"shard {index} needs {stop - start} rows, got {table.num_rows}")
        schema = store_schema(self.spec.hidden_size, self.spec.h_dec_dtype)
        table = table.select(schema.names).cast(schema)
        table = table.replace_schema_metadata({META_KEY: canonical_json(self.spec.shard_meta(index)).encode()})
        final = self.path(index)
        for stale in self.root.glob(f".{final.name}.tmp-*"):  # left by a killed run; shards have one writer
            stale.unlink(missing_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd", row_group_size=min(1024, max(1, table.num_rows)))
        os.replace(tmp, final)
        return final

    def read_manifest(self) -> dict[str, Any]:
        p = self.root / MANIFEST
        return json.loads(p.read_text()) if p.exists() else {}

    def write_manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Scan the directory and (re)write the manifest; `complete` once every shard is present."""
        old = self.read_manifest()
        # Rehash only shards whose size or mtime changed: the manifest is rewritten after every shard.
        known = {(s["name"], s.get("size"), s.get("mtime_ns")): s["sha256"] for s in old.get("shards", [])}
        shards = []
        for i in range(self.spec.n_shards):
            p = self.path(i)
            if p.exists() and read_shard_meta(p).get("fingerprint") == self.spec.fingerprint:
                st = p.stat()
                digest = known.get((p.name, st.st_size, st.st_mtime_ns)) or sha256_file(p)
                shards.append({"name": p.name, "index": i, "rows": pq.read_metadata(p).num_rows, "sha256": digest,
                               "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.spec.fingerprint,
            "settings": self.spec.settings,
            "n_samples": self.spec.n_samples,
            "shard_rows": self.spec.shard_rows,
            "n_shards": self.spec.n_shards,
            "hidden_size": self.spec.hidden_size,
            "h_dec_dtype": self.spec.h_dec_dtype,
            "complete": len(shards) == self.spec.n_shards,
            "shards": shards,
            "tool_version": __version__,
            "created": old.get("created", now),
            "updated": now,
            "run": {**old.get("run", {}), **(extra or {})},
        }
        _atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
        return manifest


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


def open_store(root: Path, checksums: bool = True) -> StoreInfo:
    """Load the manifest of a complete store and check it (schema version, shard files, sha256)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.exists():
        raise UsageError(f"{root} is not a teacher store (no {MANIFEST}); run `gedistill teacher-dump --out {root}`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{root}: store schema version {manifest.get('schema_version')}, this gedistill reads {SCHEMA_VERSION}")
    if not manifest.get("complete"):
        done = len(manifest.get("shards", []))
        raise UsageError(f"{root}: incomplete store ({done} of {manifest['n_shards']} shards); rerun teacher-dump to finish it")
    paths = []
    for s in manifest["shards"]:
        p = root / s["name"]
        if not p.exists():
            raise UsageError(f"{root}: shard {s['name']} is missing")
        if checksums and sha256_file(p) != s["sha256"]:
            raise UsageError(f"{root}: shard {s['name']} fails its sha256 check; the store is corrupted")
        paths.append(p)
    return StoreInfo(root, manifest, tuple(paths))


def iter_batches(store: Path | StoreInfo, columns: list[str] | None = None, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream record batches in sample order, one row group at a time (memory bounded by `batch_rows`)."""
    info = store if isinstance(store, StoreInfo) else open_store(store, checksums=False)
    for p in info.shard_paths:
        yield from pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=columns)

