"""The teacher store: Parquet shards + manifest.json, written by stage one and read by stage two.

The format (layout, schema, fingerprint) is in store.format; this module writes a store (resumable,
crash-safe: temporary file, fsync, rename; locked against a second writer, see store.lock) and opens
one for reading (store.read: verified first, see store.check). The names of store.format and
store.read are re-exported here. A complete store also carries a dataset card (`README.md`, store.card)
for readers without gedistill (`datasets.load_dataset(dir)`).

This module is imported by stage two: it must never import torch-for-LLMs, transformers or vllm.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.errors import UsageError
from pipeline.store.card import CARD, is_our_card, write_dataset_card
from pipeline.store.faults import fault_point
from pipeline.store.format import (H_DTYPES, MANIFEST, META_KEY, SCHEMA_VERSION, StoreSpec, canonical_json,  # noqa: F401
                                   decodes, diff_settings, fingerprint_of, read_manifest_file, read_shard_meta,
                                   sha256_file, shard_name, store_schema)
from pipeline.store.lock import LOCK_FILE, claim_shards, hold_run, manifest_lock
from pipeline.store.read import StoreInfo, iter_batches, open_store  # noqa: F401

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    """Data on disk before the rename that publishes it: a power loss then leaves no torn file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    fault_point("mid-manifest-write", tmp)
    fault_point("before-manifest-rename")
    os.replace(tmp, path)
    _fsync(path.parent)
    fault_point("torn-manifest", path)
    fault_point("after-manifest")


def mismatch(stored: dict[str, Any] | None, spec: StoreSpec) -> str | None:
    """What differs between a stored store's settings (its manifest or a shard's metadata) and this run's;
    None when there is nothing stored or it is the same store."""
    if stored is None or stored.get("fingerprint") == spec.fingerprint:
        return None
    diffs = diff_settings(stored.get("settings", {}), spec.settings)
    named = {d.split(":", 1)[0] for d in diffs}  # teacher-dump's settings hold the layout too: name it once
    layout = [f"{k}: stored {stored.get(k)}, now {getattr(spec, k)}" for k in ("n_samples", "shard_rows")
              if k not in named and k in stored and stored[k] != getattr(spec, k)]
    return "; ".join(diffs + layout or ["(fingerprint only)"])


def mismatch_message(where: Any, what: str) -> str:
    return (f"{where} holds a teacher store made with other settings; refusing to mix them. Differences: "
            + what + ". Use another --out directory, delete this one, or pass --replace-mismatched.")


class StoreWriter:
    """Writes one store directory; resumable (complete shards are kept), idempotent, and safe against a
    second writer (store.lock: a second run on the same shards is refused; workers share a directory)."""

    def __init__(self, root: Path, spec: StoreSpec, replace_mismatched: bool = False) -> None:
        """replace_mismatched: a store made with other settings is deleted (with a warning naming the
        differences) instead of refused; for pipelines that keep older outputs elsewhere (DVC's cache)."""
        self.root, self.spec = Path(root), spec
        # name -> (sha256, size, mtime_ns) of shards this process wrote or hashed. Kept in memory, not in the
        # manifest: file times differ between machines, and the manifest is a shared (DVC-hashed) output.
        self._written: dict[str, tuple[str, int, int]] = {}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            hold_run(self.root)
        except OSError as e:  # read-only or missing parent, a file in the way: the user's to fix
            raise UsageError(f"cannot write the teacher store at {self.root} ({e.strerror or e}); "
                             "choose a writable --out directory") from None
        with manifest_lock(self.root):  # a worker replacing the store must not race one that just did
            self._check_compatible(replace_mismatched)
            self._drop_manifest_temps()
        if not read_manifest_file(self.root):
            self.write_manifest()

    def _check_compatible(self, replace_mismatched: bool) -> None:
        stored: dict[str, Any] | None = read_manifest_file(self.root) or None
        for shard in [] if stored else sorted(self.root.glob("part-*.parquet")):
            try:
                stored = read_shard_meta(shard)
                break
            except Exception:  # torn: tells nothing about the settings
                continue
        what = mismatch(stored, self.spec)
        if what is None:
            return
        if replace_mismatched:
            self._clear(what)
            return
        raise UsageError(mismatch_message(self.root, what))

    def _clear(self, why: str) -> None:
        """Delete a mismatched store; only when the directory holds nothing but store files."""
        owned = [p for p in self.root.iterdir()
                 if p.is_file() and (p.name == MANIFEST or p.name.startswith("part-") and p.suffix == ".parquet"
                                     or p.name == CARD and is_our_card(p)
                                     or p.name.startswith(".") and ".tmp-" in p.name)]
        foreign = sorted(p.name for p in self.root.iterdir() if p not in owned and p.name != LOCK_FILE)
        if foreign:
            raise UsageError(f"{self.root} holds a teacher store made with other settings and also other files "
                             f"({', '.join(foreign[:5])}); not deleting it. Use another --out directory.")
        hold_run(self.root, exclusive=True)  # nobody may be writing the old store
        log.warning("%s: replacing a teacher store made with other settings (%s)", self.root, why)
        for p in owned:
            p.unlink(missing_ok=True)
        hold_run(self.root)

    def _drop_manifest_temps(self) -> None:
        """Left by a killed writer; called under the manifest lock, so no live writer owns one."""
        for stale in [*self.root.glob(f".{MANIFEST}.tmp-*"), *self.root.glob(f".{CARD}.tmp-*")]:
            stale.unlink(missing_ok=True)

    def path(self, index: int) -> Path:
        return self.root / shard_name(index, self.spec.n_shards)

    def claim(self, indices: list[int]) -> None:
        """Hold these shards against other processes; their temporary files are then stale: delete them."""
        claim_shards(self.root, indices, {i: self.path(i).name for i in indices})
        for i in indices:
            for stale in self.root.glob(f".{self.path(i).name}.tmp-*"):
                stale.unlink(missing_ok=True)

    def shard_ok(self, index: int) -> bool:
        """A final-named shard with this fingerprint and the expected rows, whose sha256 is the manifest's
        or, when the manifest does not know it (a crash before the manifest write), that decodes whole."""
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
        known = {s.get("name"): s.get("sha256") for s in self.read_manifest().get("shards", [])}
        if path.name in known and known[path.name] != sha256_file(path):
            log.warning("shard %s fails its checksum; it will be recomputed", path.name)
            return False
        if path.name not in known and not decodes(path):
            log.warning("shard %s is not in the manifest and does not decode; it will be recomputed", path.name)
            return False
        return True

    def pending(self, num_workers: int = 1, worker_index: int = 0) -> list[int]:
        if not 0 <= worker_index < num_workers:
            raise UsageError(f"--worker-index must be in 0..{num_workers - 1}, got {worker_index}")
        mine = list(range(worker_index, self.spec.n_shards, num_workers))
        self.claim(mine)
        return [i for i in mine if not self.shard_ok(i)]

    def write_shard(self, index: int, table: pa.Table) -> Path:
        start, stop = self.spec.shard_range(index)
        if table.num_rows != stop - start:
            raise ValueError(f"shard {index} needs {stop - start} rows, got {table.num_rows}")
        schema = store_schema(self.spec.hidden_size, self.spec.h_dec_dtype)
        table = table.select(schema.names).cast(schema)
        table = table.replace_schema_metadata({META_KEY: canonical_json(self.spec.shard_meta(index)).encode()})
        final = self.path(index)
        self.claim([index])
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        fault_point("before-shard-write")
        pq.write_table(table, tmp, compression="zstd", row_group_size=min(1024, max(1, table.num_rows)),
                       write_page_checksum=True)
        _fsync(tmp)
        fault_point("mid-shard-write", tmp)
        digest = sha256_file(tmp)
        fault_point("before-rename")
        os.replace(tmp, final)
        _fsync(self.root)
        st = final.stat()
        self._written[final.name] = (digest, st.st_size, st.st_mtime_ns)
        fault_point("torn-shard", final)
        fault_point("after-rename")
        return final

    def read_manifest(self) -> dict[str, Any]:
        return read_manifest_file(self.root)

    def note_digest(self, name: str, digest: str) -> None:
        """Record a shard's verified sha256 (cache merge, after checking the copy), so it is not rehashed."""
        st = (self.root / name).stat()
        self._written[name] = (digest, st.st_size, st.st_mtime_ns)

    def _entry(self, index: int, old: dict[str, Any] | None) -> dict[str, Any] | None:
        """The manifest entry of one shard, or None if it is absent, torn, foreign or fails its old sha256."""
        p = self.path(index)
        try:
            st = p.stat()
            meta, rows = read_shard_meta(p), pq.read_metadata(p).num_rows
        except Exception as e:  # missing, or a torn footer: recomputed by its worker's next run
            if p.exists():
                log.warning("%s is unreadable (%s); left out of the manifest", p.name, e)
            return None
        start, stop = self.spec.shard_range(index)
        if meta.get("fingerprint") != self.spec.fingerprint or rows != stop - start:
            return None
        mine = self._written.get(p.name)
        if mine and mine[1:] == (st.st_size, st.st_mtime_ns):
            digest = mine[0]
        else:  # once per process for a shard of an earlier run (about 1 s per GB)
            digest = sha256_file(p)
            if old and old.get("sha256") != digest:  # changed since listed: never launder it into the manifest
                log.warning("%s differs from its sha256 in the manifest; left out until it is recomputed", p.name)
                return None
            if not old and not decodes(p):  # listed by nobody yet (a crash before the manifest write)
                return None
            self._written[p.name] = (digest, st.st_size, st.st_mtime_ns)
        return {"name": p.name, "index": index, "rows": rows, "sha256": digest, "size": st.st_size}

    def write_manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Scan the directory and (re)write the manifest; `complete` once every shard is present.

        Under the manifest lock: workers sharing the directory serialize their scans and writes, so the
        last write of all lists every shard present, and none is lost to a race."""
        with manifest_lock(self.root):
            old = self.read_manifest()
            if old.get("fingerprint") != self.spec.fingerprint:
                old = {}
            self._drop_manifest_temps()
            listed = {s.get("name"): s for s in old.get("shards", []) if isinstance(s, dict)}
            shards = self._entries(listed)
            # No dates, host facts or file times: two machines writing the same store write the same bytes.
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
                "run": {**old.get("run", {}), **(extra or {})},
            }
            if manifest["complete"]:
                # Before the manifest that says `complete`: a kill in between leaves an incomplete manifest,
                # and the rerun that completes it writes the card again (store.card; no dates: same bytes).
                write_dataset_card(self.root, manifest)
            _atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
            self._published(manifest)
        return manifest

    def _entries(self, listed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The manifest's shard entries: every sound shard in the directory (store.remote: on the remote)."""
        return [e for i in range(self.spec.n_shards)
                if (e := self._entry(i, listed.get(shard_name(i, self.spec.n_shards)))) is not None]

    def _published(self, manifest: dict[str, Any]) -> None:
        """After the manifest is replaced, still under its lock: nothing for a local store (store.remote
        uploads the card and the manifest)."""

    @property
    def location(self) -> str:
        """Where the store is, as the user named it (a directory here; a URI for store.remote)."""
        return str(self.root)
