"""A teacher store at a `pyarrow.fs` URI: `s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/dir`, or
anything `pyarrow.fs.FileSystem.from_uri` opens. A plain path is a local store, handled as before.

Writing (RemoteWriter, a StoreWriter): the local crash-safe writer writes into a staging directory (under
`$GEDISTILL_CACHE/remote/`, keyed by the URI, or `teacher-dump --staging DIR`); each shard, once complete
and renamed there, is uploaded as one object, then the manifest that lists it. On an object store a PUT is
atomic (a multipart upload appears only when completed), so readers never see a torn shard; on a file
system (file://, HDFS) the object is written under a temporary name and moved. The store's objects are
the local store's files, byte for byte: the same shards, manifest and dataset card.

Resume: the remote manifest is the truth. A rerun (on any machine, even with an empty staging directory)
skips every shard the remote manifest lists whose object has the listed size and sha256 (streamed, not
stored: a rerun reads the store once, as a local rerun hashes it once), uploads staged shards that are
complete but were never uploaded, and computes the rest. A remote store made with other settings is
refused with the local message (or replaced with --replace-mismatched). The remote manifest only ever
lists objects this writer uploaded or verified.

One writer per URI: an object store has no locks. Two writers on one machine share the staging directory
and its POSIX locks, so the second is refused as locally; two on different machines both compute, upload
and overwrite each other's manifests: the store can then list a shard the other writer replaced. Stage two
verifies every shard's sha256, so such a store is refused (naming the shard), never trained on, and a rerun
of one writer repairs it. `--num-workers` is refused with a URI for that reason; `--ray` writes from its
driver only and is the way to spread one store's work over machines.

Reading (materialize_store): the manifest and every object are downloaded into the same cache directory,
each shard's sha256 checked on the way (a copy whose sha256 already matches is reused), and the local copy
is then opened as a local store, so every local check applies unchanged. Imported by stage two: pyarrow
only, no LLM imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.store import StoreWriter, mismatch, mismatch_message
from pipeline.store.card import CARD, is_our_card
from pipeline.store.faults import fault_point
from pipeline.store.format import MANIFEST, META_KEY, StoreSpec, sha256_file
from pipeline.store.lock import manifest_lock, writer_pid

log = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_KEYS = {"access_key", "secret_key", "session_token", "credential", "credentials", "token"}
# Object stores whose PUT publishes an object whole (S3 and compatibles, GCS, Azure): no temporary name needed.
_ATOMIC_PUT = {"s3", "gcs", "abfs"}
_CHUNK = 1 << 20


def is_uri(location: Any) -> bool:
    """`s3://...`, `file:///...`: a store location for pyarrow.fs. A plain path (also `./s3:x`) is not."""
    return isinstance(location, str) and bool(_URI.match(location))


def display(uri: str) -> str:
    """The URI without credentials (user:secret@, access_key=/secret_key= in the query): for messages and keys."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _SECRET_KEYS])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def shown(location: Any) -> str:
    """A store location as recorded in reports and configs (shared outputs): a URI without its credentials."""
    return display(location) if is_uri(location) else str(location)


def _scrub(text: str, uri: str) -> str:
    """pyarrow's error text with the URI's credentials taken out (its messages quote the URI as given)."""
    parts = urlsplit(uri)
    secrets = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in _SECRET_KEYS]
    userinfo = parts.netloc.rpartition("@")[0]
    secrets += [userinfo, *userinfo.split(":")] if userinfo else []
    text = text.replace(uri, display(uri))
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def cache_root() -> Path:
    """Local copies of remote stores: `$GEDISTILL_CACHE/remote` (default ~/.cache/gedistill/remote)."""
    return Path(os.environ.get("GEDISTILL_CACHE", "~/.cache/gedistill")).expanduser() / "remote"


def _is_store_file(name: str) -> bool:
    return name == MANIFEST or name == CARD or name.startswith("part-") and name.endswith(".parquet")


class Remote:
    """One store prefix on a pyarrow file system: list, read, hash, download and upload its objects."""

    def __init__(self, uri: str) -> None:
        self.uri, self.name = uri, display(uri)
        try:
            self.fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UsageError(f"{self.name}: pyarrow.fs cannot open this location ({_scrub(str(e), uri)}); give a "
                             "local directory or a URI such as s3://bucket/prefix, gs://bucket/prefix or "
                             "file:///absolute/path") from None
        self.path = path.rstrip("/")
        if not self.path:
            raise UsageError(f"{self.name}: give a prefix inside the bucket (s3://bucket/teacher), not a bare root")
        self.atomic_put = self.fs.type_name in _ATOMIC_PUT

    def key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def local_dir(self, base: Path | None = None) -> Path:
        """The staging / read-cache directory of this URI: one per location, named so a person can tell."""
        digest = hashlib.sha256(f"{self.fs.type_name}|{self.name}".encode()).hexdigest()[:16]
        tail = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.strip("/").rsplit("/", 1)[-1])[:40]  # never empty
        return Path(base) if base is not None else cache_root() / f"{tail}-{digest}"

    def _io(self, what: str, e: Exception) -> UsageError:
        return UsageError(f"{self.name}: cannot {what} ({_scrub(str(e), self.uri)}); check the URI, the "
                          "credentials (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) and that the "
                          "bucket exists")

    def list(self) -> dict[str, int]:
        """name -> size of the objects directly under the prefix (none when it does not exist yet)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))
        except (pa.ArrowException, OSError) as e:
            raise self._io("list the store", e) from None
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def read_bytes(self, name: str) -> bytes | None:
        try:
            if self.fs.get_file_info(self.key(name)).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(self.key(name)) as f:
                return f.read()
        except (pa.ArrowException, OSError) as e:
            raise self._io(f"read {name}", e) from None

    def read_manifest(self) -> dict[str, Any]:
        """The remote manifest, or {} when it is missing or unreadable (as store.format.read_manifest_file)."""
        raw = self.read_bytes(MANIFEST)
        if raw is None:
            return {}
        try:
            m = json.loads(raw)
            return m if isinstance(m, dict) else {}
        except ValueError as e:
            log.warning("%s/%s is unreadable (%s); it will be rebuilt", self.name, MANIFEST, e)
            return {}

    def shard_meta(self, name: str) -> dict[str, Any]:
        """A remote shard's gedistill metadata, from its footer (a range read, not the whole object)."""
        with self.fs.open_input_file(self.key(name)) as f:
            md = pq.read_metadata(f).metadata or {}
        if META_KEY not in md:
            raise ValueError(f"{name}: no gedistill key-value metadata")
        return json.loads(md[META_KEY])

    def sha256(self, name: str) -> str:
        """Streamed: the object is read once and not stored."""
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.key(name)) as f:
            while block := f.read(_CHUNK):
                h.update(block)
        return h.hexdigest()

    def download(self, name: str, dest: Path) -> str:
        """Copy one object to `dest` (temporary name, fsync, rename); its sha256."""
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.key(name)) as src, open(tmp, "wb") as out:
                while block := src.read(_CHUNK):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except (pa.ArrowException, OSError) as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename:  # the local side: disk full, no permission
                raise
            raise self._io(f"download {name}", e) from None
        os.replace(tmp, dest)
        return h.hexdigest()

    def upload(self, local: Path, name: str, fault: str | None = None) -> None:
        """One object, whole or absent: a PUT on an object store, a temporary object and a move elsewhere.
        `fault`: the mid-upload fault point (tests kill the process with half the bytes sent)."""
        total = local.stat().st_size
        key = self.key(name)
        target = key if self.atomic_put else self.key(f".{name}.tmp-{os.getpid()}")
        sent = 0
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(target) as out:
                while block := src.read(min(_CHUNK, max(1, total // 2 - sent)) if sent < total // 2 else _CHUNK):
                    out.write(block)
                    sent += len(block)
                    if fault and sent == total // 2:
                        fault_point(fault)
            if target != key:
                self.fs.move(target, key)
            size = self.fs.get_file_info(key).size
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, OSError) and e.filename:  # the local side: the staged file went missing
                raise
            raise self._io(f"upload {name}", e) from None
        if size != total:
            raise OSError(f"{self.name}/{name}: {size} bytes after the upload, {total} sent")

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.key(name))
        except FileNotFoundError:
            pass
        except (pa.ArrowException, OSError) as e:
            raise self._io(f"delete {name}", e) from None

    def check_writable(self) -> None:
        """Before the teacher loads (minutes): a bad bucket or credentials are reported at once."""
        probe = f".write-probe.tmp-{os.getpid()}"
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(self.key(probe)) as out:
                out.write(b"")
            self.fs.delete_file(self.key(probe))
        except (pa.ArrowException, OSError) as e:
            raise self._io("write there", e) from None


class RemoteWriter(StoreWriter):
    """StoreWriter on a staging directory whose shards, card and manifest are published to a URI."""

    def __init__(self, uri: str, spec: StoreSpec, replace_mismatched: bool = False,
                 staging: Path | None = None) -> None:
        self.remote = Remote(uri)
        self.remote.check_writable()  # creates the prefix on a file system (file://, HDFS), where uploads need it
        self.spec = spec
        self._uploaded: dict[str, dict[str, Any]] = {}  # name -> manifest entry of what this process uploaded
        self._remote_bad: set[str] = set()  # listed remotely, but the object is missing or differs
        listing = self.remote.list()
        manifest = self.remote.read_manifest()
        stored: dict[str, Any] | None = manifest or None
        for name in [] if stored else sorted(n for n in listing if n.startswith("part-")):
            try:
                stored = self.remote.shard_meta(name)
                break
            except Exception:  # noqa: BLE001 - an object that is no shard tells nothing about the settings
                continue
        what = mismatch(stored, spec)
        if what is not None:
            if not replace_mismatched:
                raise UsageError(mismatch_message(self.remote.name, what))
            self._clear_remote(what, listing)
            manifest, listing = {}, {}
        self._manifest = manifest if manifest.get("fingerprint") == spec.fingerprint else {}
        self._listing = listing
        for name in listing:  # left by a killed upload to a file system (one writer per URI: none is live)
            if name.startswith(".") and ".tmp-" in name:
                self.remote.delete(name)
        root = self.remote.local_dir(staging)
        # The staging directory is a cache of this URI: a store of other settings left there is replaced.
        super().__init__(root, spec, replace_mismatched=True)
        if not self._manifest:  # the local writer found its own manifest: the remote still needs one
            self.write_manifest()

    @property
    def location(self) -> str:
        return self.remote.name

    def _clear_remote(self, why: str, listing: dict[str, int]) -> None:
        owned = [n for n in listing if _is_store_file(n) or n.startswith(".") and ".tmp-" in n]
        foreign = sorted(set(listing) - set(owned))
        if foreign:
            raise UsageError(f"{self.remote.name} holds a teacher store made with other settings and also other "
                             f"objects ({', '.join(foreign[:5])}); not deleting it. Use another --out location.")
        log.warning("%s: replacing a teacher store made with other settings (%s)", self.remote.name, why)
        for name in sorted(owned, key=lambda n: n != MANIFEST):  # the manifest first: no listing outlives its shards
            self.remote.delete(name)

    def read_manifest(self) -> dict[str, Any]:
        return self._manifest

    def _listed(self) -> dict[str, dict[str, Any]]:
        return {s.get("name"): s for s in self._manifest.get("shards", []) if isinstance(s, dict)}

    def pending(self, num_workers: int = 1, worker_index: int = 0) -> list[int]:
        check_target(self.remote.uri, num_workers=num_workers)
        indices = list(range(self.spec.n_shards))
        self.claim(indices)
        listed, todo = self._listed(), []
        for i in indices:
            name = self.path(i).name
            entry = listed.get(name)
            if entry is not None and self._remote_matches(name, entry):
                continue
            if entry is not None:
                self._remote_bad.add(name)
            if super().shard_ok(i):  # complete in staging but not (soundly) on the remote: publish it
                self._publish_shard(i)
                continue
            todo.append(i)
        return todo

    def _remote_matches(self, name: str, entry: dict[str, Any]) -> bool:
        size = self._listing.get(name)
        if size is None:
            log.warning("%s/%s is listed in the manifest but missing; it will be recomputed", self.remote.name, name)
            return False
        if size != entry.get("size") or self.remote.sha256(name) != entry.get("sha256"):
            log.warning("%s/%s differs from its manifest entry; it will be recomputed", self.remote.name, name)
            return False
        return True

    def write_shard(self, index: int, table: pa.Table) -> Path:
        final = super().write_shard(index, table)
        self._publish_shard(index)
        return final

    def _publish_shard(self, index: int) -> None:
        name = self.path(index).name
        entry = self._entry(index, None)
        if entry is None:  # never: write_shard and shard_ok just checked it
            raise RuntimeError(f"{name}: the staged shard is not sound; rerun teacher-dump")
        fault_point("before-shard-upload")
        self.remote.upload(self.path(index), name, fault="mid-shard-upload")
        fault_point("after-shard-upload")
        self._listing[name] = entry["size"]
        self._remote_bad.discard(name)
        self._uploaded[name] = entry

    def _entries(self, listed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Only what is on the remote: shards this process uploaded, and listed ones not found bad (before
        pending() has checked them, the initial manifest write keeps the remote's listing as it was)."""
        remote = self._listed()
        out = []
        for i in range(self.spec.n_shards):
            name = self.path(i).name
            if name in self._uploaded:
                out.append(self._uploaded[name])
            elif name in remote and name not in self._remote_bad:
                out.append(remote[name])
        return out

    def _published(self, manifest: dict[str, Any]) -> None:
        fault_point("before-manifest-upload")
        if manifest["complete"] and (self.root / CARD).is_file():  # the card before the manifest, as locally
            self.remote.upload(self.root / CARD, CARD)
        self.remote.upload(self.root / MANIFEST, MANIFEST)
        self._manifest = manifest
        fault_point("after-manifest-upload")


def check_target(out: str | Path, staging: Path | None = None, num_workers: int = 1) -> None:
    """Options that cannot go with this --out: --staging with a local directory, --num-workers with a URI
    (teacher-dump checks them before the teacher loads; the writer checks them again for library callers)."""
    if not is_uri(out):
        if staging is not None:
            raise UsageError("--staging applies to an --out at a URI (s3://..., file:///...); a local --out is "
                             "written in place: drop --staging")
    elif num_workers != 1:
        raise UsageError(f"--num-workers needs one store directory every worker can lock; {display(str(out))} is a "
                         "URI, which has no locks. Use --ray (one driver writes every shard), or write the workers' "
                         "stores to local directories and `gedistill cache merge` them")


def open_writer(out: str | Path, spec: StoreSpec, replace_mismatched: bool = False,
                staging: Path | None = None) -> StoreWriter:
    """The writer of a store at `out`: a local directory, or a URI (RemoteWriter, staged in `staging`)."""
    check_target(out, staging)
    if is_uri(out):
        return RemoteWriter(str(out), spec, replace_mismatched, staging)
    return StoreWriter(Path(out), spec, replace_mismatched)


def materialize_store(location: str | Path, recheck: bool = False, cache: Path | None = None) -> Path:
    """A local directory holding the store at `location`: a plain path is returned as it is; a URI's store
    is downloaded into its cache directory (the staging directory of a teacher-dump to the same URI on this
    machine), every shard's sha256 checked against the remote manifest on the way. A local copy whose
    size and sha256 already match is reused, unless `recheck` (`cache verify`: the remote's bytes are read
    again). A shard whose download differs from the manifest is kept as downloaded and logged: the local
    checks (store.check.verify_store, open_store) then refuse the store naming that shard."""
    if not is_uri(location):
        return Path(location)
    remote = Remote(str(location))
    raw = remote.read_bytes(MANIFEST)
    if raw is None:
        raise UsageError(f"{remote.name} is not a teacher store (no {MANIFEST} there); check the URI, or run "
                         f"`gedistill teacher-dump --out {remote.name}`")
    try:
        manifest = json.loads(raw)
        listed = {s["name"]: s for s in manifest["shards"]}
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{remote.name}/{MANIFEST} is unreadable or not a store manifest ({type(e).__name__}: {e}); "
                         f"rerun `gedistill teacher-dump --out {remote.name}` with the same options") from None
    local = remote.local_dir(cache)
    local.mkdir(parents=True, exist_ok=True)
    pid = writer_pid(local)
    if pid is not None:
        raise UsageError(f"{remote.name} is being written on this machine by {f'pid {pid}' if pid else 'another process'} "
                         f"(teacher-dump, staging in {local}); wait for it to finish, then run this again")
    with manifest_lock(local):  # a teacher-dump staging here on this machine writes its manifest under it
        listing = remote.list()
        for p in local.iterdir():  # what the remote no longer has: a copy would read as part of the store
            if p.is_file() and _is_store_file(p.name) and p.name not in listing and p.name != MANIFEST \
                    and (p.name != CARD or is_our_card(p)):
                p.unlink()
        fetched = 0
        for name, size in sorted(listing.items()):
            if not _is_store_file(name) or name == MANIFEST:
                continue
            dest = local / name
            want = listed.get(name, {}).get("sha256")
            if not recheck and dest.is_file() and dest.stat().st_size == size \
                    and (name == CARD and dest.read_bytes() == remote.read_bytes(name)
                         or want is not None and sha256_file(dest) == want):
                continue
            digest = remote.download(name, dest)
            fetched += 1
            if want is not None and digest != want:
                log.warning("%s/%s: its sha256 differs from the manifest (corrupted or replaced)", remote.name, name)
        tmp = local / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_bytes(raw)
        os.replace(tmp, local / MANIFEST)
    log.info("%s: local copy at %s (%d object(s) downloaded, %d reused)", remote.name, local, fetched,
             sum(1 for n in listing if _is_store_file(n) and n != MANIFEST) - fetched)
    return local

