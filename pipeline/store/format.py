"""The teacher store's format: layout, Arrow schema, settings fingerprint, shard metadata, manifest reading.

Shards are `part-00003-of-00016.parquet` (zstd, with Parquet page checksums), each a contiguous slice
of the sample list; `manifest.json` holds the schema version, the fingerprinted settings, and per shard
its row count and sha256. Each shard carries the same facts in its Parquet key-value metadata (key
`gedistill`), so a shard is self-describing. Imported by stage two: no LLM imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
        ("status", pa.string()),  # one of pipeline.teacher.parse.STATUSES (ok, repaired, failed, no_decision, cut)
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


def read_manifest_file(root: Path) -> dict[str, Any]:
    """The manifest, or {} when it is missing or unreadable (torn or zero-length after a crash)."""
    p = Path(root) / MANIFEST
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        return m if isinstance(m, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); it will be rebuilt from the shards", p, e)
        return {}


def decodes(path: Path) -> bool:
    """Every page of the file decodes and passes its CRC (written with page checksums)."""
    try:
        for _ in pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=4096):
            pass
        return True
    except Exception as e:  # a torn or bit-flipped file can fail anywhere in the Parquet reader
        log.warning("%s does not decode (%s)", path.name, e)
        return False
