"""Checks on a teacher store: `cache verify`, `cache merge` (per source) and `open_store` (stage two).

Streaming: one record batch at a time, never the whole store in memory. Every problem starts with
the file it is about (`manifest.json: ...`, `part-00002-of-00004.parquet: ...`). No LLM imports here:
stage two and CI verify stores without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.format import (H_DTYPES, MANIFEST, SCHEMA_VERSION, StoreSpec, fingerprint_of, read_shard_meta,
                                   sha256_file, shard_name, store_schema)
from pipeline.teacher.parse import STATUSES

_LAYOUT = {"n_samples": int, "shard_rows": int, "hidden_size": int, "h_dec_dtype": str, "fingerprint": str,
           "settings": dict, "shards": list}


def manifest_spec(m: Any) -> tuple[StoreSpec | None, list[str]]:
    """The layout a manifest describes, and what is wrong with the manifest itself."""
    if not isinstance(m, dict):
        return None, [f"{MANIFEST}: not a JSON object"]
    if m.get("schema_version") != SCHEMA_VERSION:
        return None, [f"{MANIFEST}: schema version {m.get('schema_version')}, expected {SCHEMA_VERSION}"]
    bad = [k for k, t in _LAYOUT.items() if not isinstance(m.get(k), t)]
    if bad or m["h_dec_dtype"] not in H_DTYPES or min(m["n_samples"], m["shard_rows"], m["hidden_size"]) < 1 \
            or not isinstance(m["settings"].get("k"), int) \
            or not all(isinstance(s, dict) and {"name", "rows", "sha256"} <= s.keys() for s in m["shards"]):
        return None, [f"{MANIFEST}: malformed (missing or invalid: {', '.join(bad) or 'dtype, sizes, k or shard entries'})"]
    spec = StoreSpec(m["settings"], m["n_samples"], m["shard_rows"], m["hidden_size"], m["h_dec_dtype"])
    problems = []
    if fingerprint_of(m["settings"]) != m["fingerprint"]:
        problems.append(f"{MANIFEST}: fingerprint does not match its settings (edited by hand?)")
    s = m["settings"]
    for key in ("n_samples", "shard_rows", "h_dec_dtype"):
        if key in s and s[key] != getattr(spec, key):
            problems.append(f"{MANIFEST}: {key} {getattr(spec, key)} but the settings say {s[key]}")
    width = s["teacher"].get("hidden_size") if isinstance(s.get("teacher"), dict) else None
    if width is not None and width != spec.hidden_size:
        problems.append(f"{MANIFEST}: hidden_size {spec.hidden_size} but the teacher's is {width}")
    if m.get("n_shards") != spec.n_shards:
        problems.append(f"{MANIFEST}: n_shards {m.get('n_shards')}, the layout has {spec.n_shards}")
    return spec, problems


def verify_store(root: Path, prepared: Any = None, partial: bool = False) -> list[str]:
    """Every problem found (empty when the store is sound): manifest, files, checksums, schema, rows.

    prepared (a pipeline.data.prepared.Prepared): the store must be made from it, and each row's target must
    be its user's item at that position. partial: a worker's share of a store (`cache merge` sources);
    incompleteness is then not a problem, but every shard file must be listed and sound.
    """
    root = Path(root)
    try:
        m = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e}); not a complete teacher store"]
    spec, problems = manifest_spec(m)
    if spec is None:
        return problems
    expected = [shard_name(i, spec.n_shards) for i in range(spec.n_shards)]
    listed: dict[str, dict[str, Any]] = {}
    for s in m["shards"]:
        if s["name"] in listed or s["name"] not in expected:
            problems.append(f"{MANIFEST}: lists {s['name']} {'twice' if s['name'] in listed else 'outside the layout'}")
        listed[s["name"]] = s
    in_layout = len(listed.keys() & set(expected))  # an entry outside the layout is no shard of this store
    if not partial and not (m.get("complete") is True and in_layout == spec.n_shards):
        problems.append(f"{MANIFEST}: store is incomplete: {in_layout} of {spec.n_shards} shards listed")
    if prepared is not None and m["settings"].get("prepared_fingerprint") != prepared.fingerprint:
        problems.append(f"{MANIFEST}: made from other prepared data (prepared fingerprint "
                        f"{str(m['settings'].get('prepared_fingerprint'))[:16]}, the given data {prepared.fingerprint[:16]})")
    for name in sorted({p.name for p in root.glob("part-*.parquet")} - set(expected)):
        problems.append(f"{name}: unexpected shard file (another layout or another store?)")
    schema = store_schema(spec.hidden_size, spec.h_dec_dtype)
    for i, name in enumerate(expected):
        path = root / name
        if name not in listed:
            if path.exists():
                problems.append(f"{name}: present but not listed in the manifest (rerun its teacher-dump to list it)")
            continue
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != listed[name]["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted or replaced)")
        try:
            problems += [f"{name}: {p}" for p in _check_shard(path, spec, i, schema, listed[name]["rows"], prepared)]
        except Exception as e:  # a corrupted file can fail anywhere inside the Parquet reader
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    return problems


def rankings_are_permutations(ranking: pa.Array, k: int) -> np.ndarray:
    """Boolean per row: is the list a permutation of 0..k-1?"""
    lengths = ranking.value_lengths().to_numpy(zero_copy_only=False)
    ok = lengths == k
    flat = ranking.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if ok.all() and len(flat) == k * len(lengths):
        ok = (np.sort(flat.reshape(-1, k), axis=1) == np.arange(k)).all(axis=1)
    else:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ok = np.array([lengths[i] == k and (np.sort(flat[offsets[i]:offsets[i + 1]]) == np.arange(k)).all()
                       for i in range(len(lengths))], dtype=bool)
    return ok


def _check_shard(path: Path, spec: StoreSpec, index: int, schema: pa.Schema, listed_rows: int,
                 prepared: Any = None) -> list[str]:
    problems = []
    meta = read_shard_meta(path)
    want = spec.shard_meta(index)
    if meta.get("fingerprint") != spec.fingerprint:
        problems.append("fingerprint in the shard metadata differs from the manifest (a shard of another store?)")
    elif any(meta.get(key) != want[key] for key in ("shard", "n_shards", "start", "stop", "hidden_size", "h_dec_dtype")):
        problems.append("shard metadata does not match its place in the layout")
    pf = pq.ParquetFile(path, page_checksum_verification=True)
    if not pf.schema_arrow.remove_metadata().equals(schema):
        problems.append(f"schema differs from the expected one (h_dec {spec.h_dec_dtype} x {spec.hidden_size}): "
                        f"{pf.schema_arrow.remove_metadata()}")
        return problems
    start, stop = spec.shard_range(index)
    if pf.metadata.num_rows != listed_rows or listed_rows != stop - start:
        problems.append(f"{pf.metadata.num_rows} rows, manifest says {listed_rows}, layout says {stop - start}")
    k = spec.settings["k"]
    next_id, bad = start, {"perm": 0, "len": 0, "status": 0, "h": 0, "rows": 0}
    cols = ["sample_id", "user_idx", "position", "target", "candidates", "ranking", "scores", "status", "h_dec"]
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        ids = batch.column("sample_id").to_numpy(zero_copy_only=False)
        if len(ids) and not np.array_equal(ids, np.arange(next_id, next_id + len(ids))):
            problems.append(f"sample_id not contiguous from {next_id} (rows permuted or duplicated?)")
        next_id += len(ids)
        bad["perm"] += int((~rankings_are_permutations(batch.column("ranking"), k)).sum())
        for col in ("candidates", "scores"):
            bad["len"] += int(pc.sum(pc.not_equal(pc.list_value_length(batch.column(col)), k)).as_py() or 0)
        bad["status"] += len(ids) - int(pc.sum(pc.is_in(batch.column("status"), value_set=pa.array(STATUSES))).as_py() or 0)
        h = batch.column("h_dec").flatten().to_numpy(zero_copy_only=False)
        bad["h"] += int((~np.isfinite(h.reshape(len(ids), -1))).any(axis=1).sum()) if len(ids) else 0
        if prepared is not None:
            bad["rows"] += _rows_against(batch, prepared)
    for key, text in (("perm", f"ranking(s) are not permutations of 0..{k - 1}"),
                      ("len", f"candidates/scores list(s) without K={k} entries"),
                      ("status", f"row(s) with a status other than {', '.join(STATUSES)}"),
                      ("h", "row(s) with a non-finite h_dec"),
                      ("rows", "row(s) whose user/position/target are not in the given prepared data")):
        if bad[key]:
            problems.append(f"{bad[key]} {text}")
    return problems


def _rows_against(batch: pa.RecordBatch, prepared: Any) -> int:
    """Rows whose target is not train[user][position] in the prepared data (a store of other data)."""
    users, pos, target = (batch.column(c).to_numpy(zero_copy_only=False).astype(np.int64)
                          for c in ("user_idx", "position", "target"))
    wrong = 0
    for u, p, t in zip(users, pos, target):
        seq = prepared.train[u] if 0 <= u < prepared.n_users else ()
        wrong += not (0 <= p < len(seq) and int(seq[p]) == t)
    return wrong
