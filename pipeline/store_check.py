"""Checks on a teacher store (`cache verify`) and the merge of partial worker runs (`cache merge`).

No LLM imports here either: stage two and CI verify stores without transformers.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.store import (MANIFEST, SCHEMA_VERSION, StoreSpec, StoreWriter, fingerprint_of, read_shard_meta,
                            sha256_file, shard_name, store_schema)
from pipeline.teacher.parse import STATUSES

log = logging.getLogger(__name__)


def verify_store(root: Path) -> list[str]:
    """Every problem found (empty when the store is sound): manifest, schema, rows, checksums, rankings."""
    root = Path(root)
    try:
        m = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return [f"cannot read {root / MANIFEST}: {e}"]
    problems: list[str] = []
    if m.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema version {m.get('schema_version')}, expected {SCHEMA_VERSION}")
        return problems
    if fingerprint_of(m["settings"]) != m["fingerprint"]:
        problems.append("manifest fingerprint does not match its settings (edited by hand?)")
    spec = StoreSpec(m["settings"], m["n_samples"], m["shard_rows"], m["hidden_size"], m["h_dec_dtype"])
    listed = {s["name"]: s for s in m.get("shards", [])}
    expected = [shard_name(i, spec.n_shards) for i in range(spec.n_shards)]
    if not m.get("complete"):
        problems.append(f"store is incomplete: {len(listed)} of {spec.n_shards} shards in the manifest")
    for name in sorted(set(p.name for p in root.glob("part-*.parquet")) - set(expected)):
        problems.append(f"{name}: unexpected shard file (another layout?)")
    schema = store_schema(spec.hidden_size, spec.h_dec_dtype)
    k = m["settings"]["k"]
    for i, name in enumerate(expected):
        path = root / name
        if name not in listed:
            if m.get("complete"):
                problems.append(f"{name}: not listed in the manifest")
            continue
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != listed[name]["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted or replaced)")
        try:
            problems += [f"{name}: {p}" for p in _check_shard(path, spec, i, schema, k, listed[name]["rows"])]
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


def _check_shard(path: Path, spec: StoreSpec, index: int, schema: Any, k: int, listed_rows: int) -> list[str]:
    problems = []
    meta = read_shard_meta(path)
    if meta.get("fingerprint") != spec.fingerprint:
        problems.append("fingerprint in the shard metadata differs from the manifest")
    pf = pq.ParquetFile(path)
    if not pf.schema_arrow.remove_metadata().equals(schema):
        problems.append(f"schema differs from the expected one: {pf.schema_arrow.remove_metadata()}")
        return problems
    start, stop = spec.shard_range(index)
    if pf.metadata.num_rows != listed_rows or listed_rows != stop - start:
        problems.append(f"{pf.metadata.num_rows} rows, manifest says {listed_rows}, layout says {stop - start}")
    next_id, bad_perm, bad_len, bad_status = start, 0, 0, 0
    for batch in pf.iter_batches(columns=["sample_id", "candidates", "ranking", "scores", "status"], batch_size=4096):
        ids = batch.column("sample_id").to_numpy()
        if len(ids) and not np.array_equal(ids, np.arange(next_id, next_id + len(ids))):
            problems.append(f"sample_id not contiguous from {next_id}")
        next_id += len(ids)
        bad_perm += int((~rankings_are_permutations(batch.column("ranking"), k)).sum())
        for col in ("candidates", "scores"):
            bad_len += int(pc.sum(pc.not_equal(pc.list_value_length(batch.column(col)), k)).as_py() or 0)
        known = pc.is_in(batch.column("status"), value_set=pa.array(STATUSES))
        bad_status += len(ids) - int(pc.sum(known).as_py() or 0)
    if bad_perm:
        problems.append(f"{bad_perm} ranking(s) are not permutations of 0..{k - 1}")
    if bad_len:
        problems.append(f"{bad_len} candidates/scores list(s) without K={k} entries")
    if bad_status:
        problems.append(f"{bad_status} row(s) with a status other than {', '.join(STATUSES)}")
    return problems


def merge_stores(out: Path, sources: list[Path]) -> dict[str, Any]:
    """Join the shards of W partial runs into `out` and prove they add up to one run.

    All sources must share one fingerprint; a shard present in two sources must be byte-identical;
    every shard must be present somewhere. `out` may be one of the sources.
    """
    out = Path(out)
    manifests = []
    for src in sources:
        p = Path(src) / MANIFEST
        if not p.exists():
            raise UsageError(f"{src}: no {MANIFEST}; is it a teacher-dump --out directory?")
        manifests.append(json.loads(p.read_text()))
    fps = {m["fingerprint"] for m in manifests}
    if len(fps) != 1:
        raise UsageError(f"the sources were made with different settings (fingerprints {sorted(f[:12] for f in fps)}); they cannot be merged")
    m0 = manifests[0]
    spec = StoreSpec(m0["settings"], m0["n_samples"], m0["shard_rows"], m0["hidden_size"], m0["h_dec_dtype"])
    found: dict[str, tuple[Path, str]] = {}
    for src in map(Path, sources):
        for i in range(spec.n_shards):
            p = src / shard_name(i, spec.n_shards)
            if not p.exists() or read_shard_meta(p).get("fingerprint") != spec.fingerprint:
                continue
            digest = sha256_file(p)
            if p.name in found and found[p.name][1] != digest:
                raise UsageError(f"{p.name} differs between {found[p.name][0].parent} and {src}: the partial runs disagree")
            found.setdefault(p.name, (p, digest))
    missing = [shard_name(i, spec.n_shards) for i in range(spec.n_shards) if shard_name(i, spec.n_shards) not in found]
    if missing:
        raise UsageError(f"{len(missing)} shard(s) are in no source, e.g. {missing[0]}; run the missing worker(s)")
    writer = StoreWriter(out, spec)
    for name, (p, _) in found.items():
        if p.resolve() != (out / name).resolve():
            tmp = out / f".{name}.tmp-merge"
            shutil.copyfile(p, tmp)
            tmp.replace(out / name)
    run = {"merged_from": [str(s) for s in sources]}
    return writer.write_manifest(extra=run)
