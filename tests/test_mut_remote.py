"""pipeline/store/remote.py checked in-process (docs/MUTATION.md, note 17): test_store_remote.py drives a real S3
server, but only through subprocesses, which mutmut cannot see, so the module's own decisions were never
scored. Here every path runs in this process on `file://` URIs (pyarrow's LocalFileSystem behind the same
`pyarrow.fs` calls an object store gets): what a URI is and how it is shown, the cache directory, each
object operation and its errors, the writer's resume decisions (which remote shards it trusts, skips,
publishes or recomputes, and what it logs), replacing a store of other settings, and the read side's
local copy. Fake teacher; 10 samples in shards of 3, 3, 3, 1."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipeline.store.remote as remote_mod
from pipeline.errors import UsageError
from pipeline.store import MANIFEST, StoreSpec, StoreWriter
from pipeline.store.card import CARD
from pipeline.store.remote import (Remote, RemoteWriter, cache_root, check_target, display, is_uri,
                                   materialize_store, open_writer)
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

SHARDS = [f"part-0000{i}-of-00004.parquet" for i in range(4)]
STORE_FILES = [CARD, MANIFEST, *SHARDS]
LOG = "pipeline.store.remote"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(inputs, the local store's files by name): what every store at a URI must equal byte for byte."""
    root = tmp_path_factory.mktemp("remote_ref")
    inputs = load_inputs(*make_inputs(root / "in"))
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, root / "local")
    return inputs, {n: (root / "local" / n).read_bytes() for n in STORE_FILES}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch) -> Path:
    """$GEDISTILL_CACHE in this test's directory, and no fault injection from the environment."""
    monkeypatch.setenv("GEDISTILL_CACHE", str(tmp_path / "gcache"))
    monkeypatch.delenv("GEDISTILL_FAULT", raising=False)
    return tmp_path / "gcache"


def dump(inputs, uri: str, staging: Path | None = None, backend: FakeBackend | None = None, **cfg):
    return run_dump(DumpConfig(shard_rows=3, staging=staging, **cfg), inputs, backend or FakeBackend(),
                    FAKE_TEACHER, uri)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".lock")}


def messages(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == level]


def manifest_names(raw: bytes) -> list[str]:
    return [s["name"] for s in json.loads(raw)["shards"]]


def spec_of(raw: bytes, **changed) -> StoreSpec:
    """The spec of the store whose manifest is `raw`, with some settings changed."""
    m = json.loads(raw)
    return StoreSpec({**m["settings"], **changed}, m["n_samples"], m["shard_rows"], m["hidden_size"], m["h_dec_dtype"])


def flipped(data: bytes, at: int | None = None, bit: int = 0xFF) -> bytes:
    """The same bytes with one changed (the middle one by default): same size, other sha256."""
    out = bytearray(data)
    out[len(out) // 2 if at is None else at] ^= bit
    return bytes(out)


# ------------------------------------------------------------------ locations


def test_what_is_a_uri_and_how_it_is_shown_without_secrets():
    """Fails if a plain path (relative `./s3:x`, a Path, `s3:/x` that typer folds a URI into) is taken for a URI
    or a scheme that starts with a digit is accepted, or if a credential survives in the shown name: the
    user:secret@ part, or any of the secret query keys; other query keys (blank values too) and the fragment
    are kept in their order."""
    for uri in ("s3://bkt/p", "gs://b/p", "file:///abs/dir", "hdfs+x.y-z://h/p", "S3://bkt/p"):
        assert is_uri(uri), uri
    for not_uri in ("./s3:x", "s3:/bkt/p", "/abs/dir", "1s3://bkt/p", "://x", "", Path("s3://bkt")):
        assert not is_uri(not_uri), not_uri
    shown = display("s3://AKIA:s3cr3t@bkt/pre/fix?region=eu&access_key=a&secret_key=b&session_token=c&credential=d"
                    "&credentials=e&token=f&x=&scheme=http#frag")
    assert shown == "s3://bkt/pre/fix?region=eu&x=&scheme=http#frag"
    assert display("file:///abs/dir") == "file:///abs/dir"
    # what student-train's config and evaluate's report record: a path as given, a URI without credentials
    assert remote_mod.shown("s3://KEY:SECRET@bkt/p") == "s3://bkt/p"
    assert remote_mod.shown(Path("/a/b?c=d")) == "/a/b?c=d"
    assert remote_mod.shown("rel/x?secret_key=1") == "rel/x?secret_key=1"


def test_the_cache_directory_follows_gedistill_cache_then_home(monkeypatch, tmp_path: Path):
    """Fails if $GEDISTILL_CACHE is ignored, its `remote` subdirectory dropped, or `~` not expanded in either."""
    monkeypatch.setenv("GEDISTILL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "remote"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GEDISTILL_CACHE", "~/elsewhere")
    assert cache_root() == tmp_path / "home" / "elsewhere" / "remote"
    monkeypatch.delenv("GEDISTILL_CACHE")
    assert cache_root() == tmp_path / "home" / ".cache" / "gedistill" / "remote"


def test_store_files_are_the_manifest_the_card_and_parquet_shards():
    assert remote_mod._is_store_file(MANIFEST) and remote_mod._is_store_file(CARD)
    assert remote_mod._is_store_file("part-00000-of-00004.parquet")
    for other in ("part-00000-of-00004.parquet.tmp", "x.parquet", "notes.txt", "readme.md", "manifest.json.bak",
                  ".part-00000-of-00004.parquet.tmp-1"):
        assert not remote_mod._is_store_file(other), other


def test_a_location_pyarrow_cannot_open_or_a_bare_root_is_a_usage_error_saying_what_to_give(tmp_path: Path):
    """Fails if the message drops what to give, or if a credential reaches it: pyarrow's own error quotes the URI
    as given (seen: `Unrecognized filesystem type in URI: nosuch://user:pw@x/y` in the message before the
    fix), so the password and secret query values must be taken out of pyarrow's text too."""
    with pytest.raises(UsageError) as e:
        Remote("nosuch://user:pw@x/y")
    text = str(e.value)
    assert text.startswith("nosuch://x/y: pyarrow.fs cannot open this location (") and "pw" not in text
    assert "Unrecognized filesystem type in URI: nosuch://x/y)" in text
    with pytest.raises(UsageError) as e:
        Remote("nosuch://AKIDX:Wj4rSecret@x/y?region=eu&secret_key=Zq9Secret&token=T0kSecret")
    assert "Secret" not in str(e.value) and "AKIDX" not in str(e.value)
    assert remote_mod._scrub("a Wj4rSecret b AKIDX:Wj4rSecret c Zq9Secret",
                             "s3://AKIDX:Wj4rSecret@bkt/p?secret_key=Zq9Secret&access_key=&region=eu") == \
        "a *** b *** c ***"
    assert text.endswith("; give a local directory or a URI such as s3://bucket/prefix, gs://bucket/prefix or "
                         "file:///absolute/path")
    with pytest.raises(UsageError) as e:
        Remote("file:///")
    assert str(e.value) == "file:///: give a prefix inside the bucket (s3://bucket/teacher), not a bare root"
    r = Remote(f"file://{tmp_path}/pub/")
    assert r.path == f"{tmp_path}/pub" and r.key("a.txt") == f"{tmp_path}/pub/a.txt"
    assert r.name == f"file://{tmp_path}/pub/" and r.atomic_put is False  # a file system: temporary name, then move


def test_the_local_directory_of_a_uri_is_named_for_people_and_keyed_by_the_location(tmp_path: Path, cache: Path):
    """One directory per location (file system type and credential-free URI), named after the prefix's last
    part: fails if two locations share a directory, if credentials change it, or if the name is not the
    sanitized last part (40 characters at most) and 16 hex digits of the key's sha256."""
    uri = f"file://{tmp_path}/a!c/My%20Store+v2~"
    r = Remote(uri)
    assert r.path.endswith("/a!c/My Store+v2~")
    digest = hashlib.sha256(f"local|{uri}".encode()).hexdigest()[:16]
    assert r.local_dir() == cache / "remote" / f"My_Store_v2_-{digest}"
    assert r.local_dir(tmp_path / "mine") == tmp_path / "mine"
    other = Remote(f"file://{tmp_path}/other/My%20Store+v2~").local_dir()
    assert other != r.local_dir() and other.name.startswith("My_Store_v2_-")
    long = Remote(f"file://{tmp_path}/{'x' * 50}")
    assert long.local_dir().name == "x" * 40 + "-" + hashlib.sha256(f"local|{long.name}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------ object operations


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[Remote, Path]:
    d = tmp_path / "bucket" / "pre"
    d.mkdir(parents=True)
    (d / "a.bin").write_bytes(b"0123456789a")
    (d / "sub").mkdir()
    (d / "sub" / "deep.bin").write_bytes(b"zz")
    return Remote(f"file://{d}"), d


def test_list_and_read_see_only_objects_directly_under_the_prefix(bucket, tmp_path: Path):
    r, d = bucket
    assert r.list() == {"a.bin": 11}
    assert Remote(f"file://{tmp_path}/not-yet").list() == {}
    assert r.read_bytes("a.bin") == b"0123456789a"
    assert r.read_bytes("missing") is None and r.read_bytes("sub") is None


def test_read_manifest_is_empty_when_missing_not_an_object_or_unreadable(bucket, caplog):
    """Fails if a missing, non-object or broken manifest raises (the writer rebuilds it) or if the broken one is
    not logged by name."""
    r, d = bucket
    assert r.read_manifest() == {}
    (d / MANIFEST).write_text("[1, 2]")
    assert r.read_manifest() == {}
    (d / MANIFEST).write_text('{"shards": [')
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert r.read_manifest() == {}
    [msg] = messages(caplog)
    assert msg.startswith(f"{r.name}/{MANIFEST} is unreadable (") and msg.endswith("); it will be rebuilt")
    assert "line 1 column" in msg  # json's reason: where the file breaks
    (d / MANIFEST).write_text('{"a": 1}')
    assert r.read_manifest() == {"a": 1}


def test_sha256_and_download_stream_every_block(bucket, monkeypatch, tmp_path: Path):
    """Blocks smaller than the object: fails if a block is skipped, hashed twice or written out of order, if the
    download leaves its temporary file, or if its digest is not the object's."""
    r, d = bucket
    monkeypatch.setattr(remote_mod, "_CHUNK", 4)
    want = hashlib.sha256(b"0123456789a").hexdigest()
    assert r.sha256("a.bin") == want
    dest = tmp_path / "dl" / "a.bin"
    dest.parent.mkdir()
    assert r.download("a.bin", dest) == want
    assert dest.read_bytes() == b"0123456789a" and os.listdir(dest.parent) == ["a.bin"]


def test_download_errors_name_the_object_or_keep_the_local_error(bucket, tmp_path: Path):
    """A remote failure is a usage error naming the object and what to check, with no temporary file left; a
    failure on the local side (here: no such directory) stays the OSError it is."""
    r, d = bucket
    (tmp_path / "dl").mkdir()
    with pytest.raises(UsageError) as e:
        r.download("missing.bin", tmp_path / "dl" / "x")
    assert str(e.value).startswith(f"{r.name}: cannot download missing.bin (")
    assert str(e.value).endswith("); check the URI, the credentials (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                 "AWS_ENDPOINT_URL) and that the bucket exists")
    assert os.listdir(tmp_path / "dl") == []
    with pytest.raises(FileNotFoundError):
        r.download("a.bin", tmp_path / "no-such-dir" / "x")


def _recorder(monkeypatch, r: Remote, name: str, stop: bool = False) -> list[tuple[str, bytes, bytes | None]]:
    """Replace the fault points: record (point, what the temporary object holds, what the final key holds),
    and raise at the mid-upload point when `stop` (a kill there)."""
    seen = []

    def point(p: str, path=None) -> None:
        tmp = next((n for n in os.listdir(r.path) if n.startswith(f".{name}.tmp-")), None)
        with open(os.path.join(r.path, tmp), "rb") if tmp else open(os.devnull, "rb") as f:
            held = f.read() if tmp else b""
        final = os.path.join(r.path, name)
        seen.append((p, held, open(final, "rb").read() if os.path.exists(final) else None))
        if stop and p.startswith("mid-"):
            raise KeyboardInterrupt
    monkeypatch.setattr(remote_mod, "fault_point", point)
    return seen


def test_upload_on_a_file_system_goes_through_a_temporary_object_cut_exactly_at_half(bucket, monkeypatch, tmp_path):
    """The mid-upload fault point must see exactly half the bytes (rounded down) in the temporary object and
    nothing under the final name, whatever the block size; after it the object is moved whole. Fails if the
    block arithmetic overshoots the half, the point is reached twice or without `fault`, or the temporary
    object is written under the final name or left behind."""
    r, d = bucket
    data = bytes(range(23))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    for chunk in (1, 3, 5, 11, 12, 1 << 20):
        monkeypatch.setattr(remote_mod, "_CHUNK", chunk)
        seen = _recorder(monkeypatch, r, "obj.bin")
        r.upload(src, "obj.bin", fault="mid-x")
        assert seen == [("mid-x", data[:11], None)], chunk
        assert (d / "obj.bin").read_bytes() == data and sorted(os.listdir(d)) == ["a.bin", "obj.bin", "sub"]
        (d / "obj.bin").unlink()
    seen = _recorder(monkeypatch, r, "obj.bin")
    r.upload(src, "obj.bin")
    assert seen == [] and (d / "obj.bin").read_bytes() == data
    seen = _recorder(monkeypatch, r, "new.bin", stop=True)
    with pytest.raises(KeyboardInterrupt):
        r.upload(src, "new.bin", fault="mid-x")
    assert "new.bin" not in os.listdir(d) and [n for n in os.listdir(d) if n.startswith(".new.bin.tmp-")]


def test_upload_to_an_object_store_puts_the_object_under_its_own_name(bucket, monkeypatch, tmp_path):
    """With an atomic PUT (S3, GCS, Azure) no temporary object is made: fails if the writer takes the
    file-system route (a temporary object and a move) or writes elsewhere."""
    r, d = bucket
    r.atomic_put = True
    src = tmp_path / "src.bin"
    src.write_bytes(b"abcdefgh")
    seen = _recorder(monkeypatch, r, "obj.bin")
    r.upload(src, "obj.bin", fault="mid-x")
    assert seen == [("mid-x", b"", b"abcd")]
    assert (d / "obj.bin").read_bytes() == b"abcdefgh" and not [n for n in os.listdir(d) if ".tmp-" in n]
    assert remote_mod._ATOMIC_PUT == {"s3", "gcs", "abfs"}


class _Liar:
    """A file system that reports another size for every object it is asked about."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def get_file_info(self, key):
        info = self._fs.get_file_info(key)
        return pafs.FileInfo(info.path, info.type, size=(info.size or 0) + 1)


def test_upload_errors_a_short_object_and_the_local_side(bucket, tmp_path: Path):
    """Fails if an object whose size differs from what was sent passes, if a remote failure is not a usage
    error naming the object, or if a missing staged file is turned into one (it is the local side's)."""
    r, d = bucket
    src = tmp_path / "src.bin"
    src.write_bytes(b"abcdefgh")
    real = r.fs
    r.fs = _Liar(real)
    with pytest.raises(OSError) as e:
        r.upload(src, "obj.bin")
    assert str(e.value) == f"{r.name}/obj.bin: 9 bytes after the upload, 8 sent"
    r.fs = real
    (d / "adir").mkdir()
    with pytest.raises(UsageError) as e:  # a directory where the object goes
        r.upload(src, "adir")
    assert str(e.value).startswith(f"{r.name}: cannot upload adir (")
    with pytest.raises(FileNotFoundError):
        r.upload(tmp_path / "gone.bin", "obj.bin")


def test_delete_ignores_a_missing_object_and_reports_a_failure(bucket):
    r, d = bucket
    r.delete("a.bin")
    assert "a.bin" not in os.listdir(d)
    r.delete("a.bin")  # already gone: nothing to do
    with pytest.raises(UsageError) as e:
        r.delete("sub")  # a directory: delete_file refuses it
    assert str(e.value).startswith(f"{r.name}: cannot delete sub (")


def test_check_writable_creates_the_prefix_leaves_no_probe_and_reports_a_bad_location(tmp_path: Path):
    r = Remote(f"file://{tmp_path}/new/deeper")
    r.check_writable()
    assert os.listdir(tmp_path / "new" / "deeper") == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError) as e:
        Remote(f"file://{tmp_path}/afile/under").check_writable()
    assert str(e.value).startswith(f"file://{tmp_path}/afile/under: cannot write there (")


# ------------------------------------------------------------------ the writer


def test_a_dump_to_a_uri_is_the_local_store_byte_for_byte_staged_under_the_cache(ref, tmp_path: Path, cache: Path):
    """Fails if any object differs from the local dump's file, anything else is left at the prefix, or the
    staging directory is not the URI's cache directory. A rerun computes nothing and leaves every byte."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    report = dump(inputs, uri)
    assert (report.shards_written, report.shards_skipped, report.complete) == (4, 0, True)
    assert report.out == uri
    assert files(tmp_path / "pub") == want
    assert files(Remote(uri).local_dir()) == want and Remote(uri).local_dir().parent == cache / "remote"
    backend = FakeBackend()
    again = dump(inputs, uri, backend=backend)
    assert (again.shards_written, again.shards_skipped, backend.calls) == (0, 4, 0)
    assert files(tmp_path / "pub") == want


def test_an_empty_staging_directory_resumes_from_the_remote_manifest_alone(ref, tmp_path: Path, caplog):
    """Another machine (fresh staging) must trust exactly the listed shards whose object has the listed size
    and sha256: a deleted one, a same-size byte flip and an unlisted object are recomputed (each listed one
    logged by name), the rest skipped."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri, staging=tmp_path / "m1")
    pub = tmp_path / "pub"
    (pub / SHARDS[0]).unlink()
    (pub / SHARDS[1]).write_bytes(flipped(want[SHARDS[1]]))
    m = json.loads(want[MANIFEST])
    m["shards"] = [s for s in m["shards"] if s["name"] != SHARDS[2]]
    m["complete"] = False
    (pub / MANIFEST).write_text(json.dumps(m))
    backend = FakeBackend()
    with caplog.at_level(logging.WARNING, logger=LOG):
        report = dump(inputs, uri, staging=tmp_path / "m2", backend=backend)
    assert (report.shards_written, report.shards_skipped) == (3, 1)
    assert messages(caplog) == [
        f"{uri}/{SHARDS[0]} is listed in the manifest but missing; it will be recomputed",
        f"{uri}/{SHARDS[1]} differs from its manifest entry; it will be recomputed"]
    assert files(pub) == want


def test_a_same_size_change_is_caught_by_the_sha256_not_only_the_size(ref, tmp_path: Path, monkeypatch):
    """The listed size matches; only the object's sha256 can tell. Fails if the writer trusts the size, or
    hashes the staged copy instead of the remote object."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    (tmp_path / "pub" / SHARDS[3]).write_bytes(flipped(want[SHARDS[3]], at=-20, bit=0x01))
    hashed = []
    real = Remote.sha256
    monkeypatch.setattr(Remote, "sha256", lambda self, name: hashed.append(name) or real(self, name))
    report = dump(inputs, uri, staging=tmp_path / "m2")
    assert report.shards_written == 1 and sorted(hashed) == SHARDS
    assert files(tmp_path / "pub") == want


def test_a_staged_shard_never_uploaded_is_published_not_recomputed(ref, tmp_path: Path):
    """Killed after the local rename, before the upload: the rerun with the same staging directory uploads the
    staged shard (no teacher call for it). Fails if it recomputes it or lists it before it is uploaded."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri, staging=tmp_path / "st")
    pub = tmp_path / "pub"
    for name in SHARDS[2:]:
        (pub / name).unlink()
    m = json.loads(want[MANIFEST])
    m["shards"], m["complete"] = m["shards"][:2], False
    (pub / MANIFEST).write_text(json.dumps(m))
    (pub / CARD).unlink()
    backend = FakeBackend()
    report = dump(inputs, uri, staging=tmp_path / "st", backend=backend)
    assert backend.calls == 0 and report.complete
    assert files(pub) == want


def test_uploads_go_shard_then_card_then_manifest_and_the_manifest_lists_only_what_is_up(ref, tmp_path: Path,
                                                                                        monkeypatch):
    """The order readers rely on: each shard before any manifest that lists it, the card only with the
    complete manifest and before it. Fails if a manifest is uploaded listing a shard not yet up, if the card
    goes up with an incomplete store or after its manifest, or a fault point is skipped."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    events: list[tuple[str, ...]] = []
    real = Remote.upload

    def upload(self, local, name, fault=None):
        up = sorted(n for n in os.listdir(self.path) if n.startswith("part-"))
        listed = manifest_names((Path(local)).read_bytes()) if name == MANIFEST else None
        events.append(("upload", name, tuple(up), tuple(listed) if listed is not None else ()))
        real(self, local, name, fault)
    monkeypatch.setattr(Remote, "upload", upload)
    monkeypatch.setattr(remote_mod, "fault_point", lambda p, path=None: events.append(("point", p)))
    dump(inputs, uri)
    uploads = [e for e in events if e[0] == "upload"]
    for _, name, up, listed in uploads:
        if name == MANIFEST:
            assert set(listed) <= set(up), (listed, up)
    names = [e[1] for e in uploads]
    cards = [i for i, n in enumerate(names) if n == CARD]
    assert cards and names[-1] == MANIFEST  # the run's last manifest (with its run record) resends the same card
    for i in cards:
        assert names[i + 1] == MANIFEST and list(uploads[i + 1][3]) == SHARDS
    first_complete = min(i for i, e in enumerate(uploads) if e[1] == MANIFEST and list(e[3]) == SHARDS)
    assert cards[0] == first_complete - 1
    assert manifest_names(want[MANIFEST]) == list(uploads[-1][3])
    per_shard = ["before-shard-upload", "mid-shard-upload", "after-shard-upload"]
    points = [e[1] for e in events if e[0] == "point"]
    manifest_points = ["before-manifest-upload", "after-manifest-upload"]
    assert points == manifest_points + (per_shard + manifest_points) * 4 + manifest_points * (len(cards) - 1)
    assert files(tmp_path / "pub") == want


def test_a_fresh_remote_gets_an_empty_manifest_before_any_shard(ref, tmp_path: Path):
    """Fails if the writer leaves the remote without a manifest until the first shard (a store others
    cannot identify), or lists anything in it."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    spec = spec_of(want[MANIFEST])
    w = RemoteWriter(uri, spec, staging=tmp_path / "st")
    assert w.location == uri and isinstance(w, StoreWriter)
    up = json.loads((tmp_path / "pub" / MANIFEST).read_bytes())
    assert (up["shards"], up["complete"], up["fingerprint"]) == ([], False, spec.fingerprint)
    assert sorted(os.listdir(tmp_path / "pub")) == [MANIFEST]
    assert w.pending() == [0, 1, 2, 3]


def test_leftover_temporary_objects_are_deleted_and_nothing_else(ref, tmp_path: Path):
    """A killed upload to a file system leaves `.NAME.tmp-PID`; the next writer deletes those and no other object."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    pub = tmp_path / "pub"
    (pub / f".{SHARDS[1]}.tmp-999").write_bytes(b"torn")
    (pub / f".{MANIFEST}.tmp-7").write_bytes(b"torn")
    (pub / ".hidden-but-mine").write_bytes(b"keep")
    dump(inputs, uri)
    assert sorted(os.listdir(pub)) == sorted([".hidden-but-mine", *STORE_FILES])


def test_a_store_of_other_settings_is_refused_naming_the_uri_and_the_difference(ref, tmp_path: Path):
    """Fails if a dump with another seed mixes into the store, or if the message names another place or leaves
    out the difference."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    with pytest.raises(UsageError) as e:
        dump(inputs, uri, seed=1)
    assert str(e.value).startswith(f"{uri} holds a teacher store made with other settings; refusing to mix them. "
                                   "Differences: seed: stored 0, now 1")
    assert files(tmp_path / "pub") == want


def test_without_a_manifest_the_first_readable_shard_tells_the_settings(ref, tmp_path: Path):
    """The manifest lost, one object named like a shard but not a shard: fails if the writer gives up on the
    junk object instead of reading the next shard's settings (then the other seed is not refused), or if it
    reads shards when a manifest exists."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    pub = tmp_path / "pub"
    (pub / MANIFEST).unlink()
    (pub / SHARDS[0]).write_bytes(b"not parquet")
    with pytest.raises(UsageError) as e:
        dump(inputs, uri, seed=1)
    assert "Differences: seed: stored 0, now 1" in str(e.value)
    report = dump(inputs, uri)  # the same settings: resumes, recomputing the junk
    assert report.complete and files(pub) == want


def test_replacing_a_mismatched_store_deletes_the_manifest_first_and_refuses_foreign_objects(ref, tmp_path: Path,
                                                                                             monkeypatch, caplog):
    """--replace-mismatched: the manifest goes first (no listing outlives its shards), then every store object
    and temporary object; a foreign object stops it before anything is deleted. Fails if the order, the
    refusal or its message changes, or if the new store keeps an old object."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    pub = tmp_path / "pub"
    (pub / "notes.txt").write_text("mine")
    (pub / "zz.txt").write_text("mine too")
    with pytest.raises(UsageError) as e:
        dump(inputs, uri, seed=1, replace_mismatched=True)
    assert str(e.value) == (f"{uri} holds a teacher store made with other settings and also other objects "
                            "(notes.txt, zz.txt); not deleting it. Use another --out location.")
    assert files(pub) == {**want, "notes.txt": b"mine", "zz.txt": b"mine too"}
    (pub / "notes.txt").unlink()
    (pub / "zz.txt").unlink()
    (pub / f".{SHARDS[0]}.tmp-5").write_bytes(b"torn")
    deleted: list[str] = []
    real = Remote.delete
    monkeypatch.setattr(Remote, "delete", lambda self, name: deleted.append(name) or real(self, name))
    with caplog.at_level(logging.WARNING, logger=LOG):
        report = dump(inputs, uri, seed=1, replace_mismatched=True)
    assert deleted[0] == MANIFEST and sorted(deleted) == sorted([f".{SHARDS[0]}.tmp-5", *STORE_FILES])
    assert messages(caplog) == [f"{uri}: replacing a teacher store made with other settings (seed: stored 0, now 1)"]
    assert report.complete and json.loads((pub / MANIFEST).read_text())["settings"]["seed"] == 1
    assert sorted(os.listdir(pub)) == sorted(STORE_FILES)


def test_options_that_cannot_go_with_the_target_are_refused_with_what_to_do(ref, tmp_path: Path):
    """--staging with a local directory, --num-workers with a URI (also from the writer itself, for library
    callers); open_writer gives a local directory the local writer."""
    inputs, want = ref
    with pytest.raises(UsageError) as e:
        check_target(tmp_path / "local", staging=tmp_path / "st")
    assert str(e.value) == ("--staging applies to an --out at a URI (s3://..., file:///...); a local --out is "
                            "written in place: drop --staging")
    check_target(tmp_path / "local")
    check_target(f"file://{tmp_path}/x", staging=tmp_path / "st")
    with pytest.raises(UsageError) as e:
        check_target("s3://u:pw@bkt/p", num_workers=2)
    assert str(e.value) == ("--num-workers needs one store directory every worker can lock; s3://bkt/p is a URI, "
                            "which has no locks. Use --ray (one driver writes every shard), or write the workers' "
                            "stores to local directories and `gedistill cache merge` them")
    with pytest.raises(UsageError) as e:
        dump(inputs, f"file://{tmp_path}/pub", num_workers=2)
    assert "--num-workers needs one store directory" in str(e.value)
    with pytest.raises(UsageError):
        dump(inputs, str(tmp_path / "local"), staging=tmp_path / "st")
    spec = spec_of(want[MANIFEST])
    w = open_writer(tmp_path / "plain", spec)
    assert type(w) is StoreWriter and w.root == tmp_path / "plain"
    assert type(open_writer(f"file://{tmp_path}/u", spec, staging=tmp_path / "st2")) is RemoteWriter


# ------------------------------------------------------------------ the read side


def test_materialize_downloads_checks_and_then_reuses_the_local_copy(ref, tmp_path: Path, monkeypatch, caplog):
    """Fails if a plain path is not returned as it is, if the copy differs from the store, if a second call
    downloads again (or `recheck` does not), if a same-size damaged local copy is reused, or if the log line's
    counts are wrong."""
    inputs, want = ref
    assert materialize_store(str(tmp_path / "x")) == tmp_path / "x"
    assert materialize_store(tmp_path / "y") == tmp_path / "y"
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri, staging=tmp_path / "st")
    got: list[str] = []
    real = Remote.download
    monkeypatch.setattr(Remote, "download", lambda self, name, dest: got.append(name) or real(self, name, dest))
    with caplog.at_level(logging.INFO, logger=LOG):
        local = materialize_store(uri, cache=tmp_path / "c")
    assert local == tmp_path / "c" and files(local) == want and sorted(got) == sorted([CARD, *SHARDS])
    got.clear()
    assert materialize_store(uri, cache=tmp_path / "c") == local and got == []
    assert materialize_store(uri, recheck=True, cache=tmp_path / "c") == local and len(got) == 5
    got.clear()
    (local / SHARDS[2]).write_bytes(flipped(want[SHARDS[2]], at=10))
    (local / CARD).write_text(want[CARD].decode().replace("Teacher store", "Teacher stor_"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG):
        materialize_store(uri, cache=tmp_path / "c")
    assert sorted(got) == [CARD, SHARDS[2]] and files(local) == want
    assert messages(caplog, logging.INFO) == [f"{uri}: local copy at {local} (2 object(s) downloaded, 3 reused)"]
    default = materialize_store(uri)
    assert default == Remote(uri).local_dir() and files(default) == want


def test_materialize_keeps_a_bad_download_for_the_local_checks_and_logs_it(ref, tmp_path: Path, caplog):
    """A remote shard that differs from the manifest is downloaded as it is and logged by name (verify_store
    then refuses the store naming it): fails if it is silently accepted or dropped."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    bad = flipped(want[SHARDS[1]])
    (tmp_path / "pub" / SHARDS[1]).write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger=LOG):
        local = materialize_store(uri, cache=tmp_path / "c")
    assert messages(caplog) == [f"{uri}/{SHARDS[1]}: its sha256 differs from the manifest (corrupted or replaced)"]
    assert (local / SHARDS[1]).read_bytes() == bad


def test_materialize_drops_what_the_remote_no_longer_has_but_not_a_persons_files(ref, tmp_path: Path):
    """A shard of an older layout in the copy would read as part of the store: removed. A README.md a person
    wrote and other files stay; gedistill's own card goes when the remote has none. Fails if any of these
    is decided the other way, or a temporary manifest is left."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    local = materialize_store(uri, cache=tmp_path / "c")
    (local / "part-00009-of-00010.parquet").write_bytes(b"old layout")
    (local / "notes.txt").write_text("mine")
    (tmp_path / "pub" / CARD).unlink()
    materialize_store(uri, cache=tmp_path / "c")
    assert sorted(files(local)) == sorted([MANIFEST, *SHARDS, "notes.txt"])
    (local / CARD).write_text("# my own notes\n")
    materialize_store(uri, cache=tmp_path / "c")
    assert (local / CARD).read_text() == "# my own notes\n"
    assert not [n for n in os.listdir(local) if ".tmp-" in n]
    assert (local / MANIFEST).read_bytes() == want[MANIFEST]


def test_materialize_refuses_what_is_not_a_store_and_a_copy_being_written(ref, tmp_path: Path, monkeypatch):
    """Exit-2 errors with what to do: no manifest, a manifest that is not JSON or lists no shards, and a
    teacher-dump staging into the same directory on this machine (its pid named, or 'another process')."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    (tmp_path / "pub").mkdir()
    with pytest.raises(UsageError) as e:
        materialize_store(uri)
    assert str(e.value) == (f"{uri} is not a teacher store (no {MANIFEST} there); check the URI, or run "
                            f"`gedistill teacher-dump --out {uri}`")
    for raw, kind in (("{nope", "JSONDecodeError"), ('{"a": 1}', "KeyError"), ('{"shards": [1]}', "TypeError")):
        (tmp_path / "pub" / MANIFEST).write_text(raw)
        with pytest.raises(UsageError) as e:
            materialize_store(uri)
        assert str(e.value).startswith(f"{uri}/{MANIFEST} is unreadable or not a store manifest ({kind}: "), raw
        assert str(e.value).endswith(f"); rerun `gedistill teacher-dump --out {uri}` with the same options")
    (tmp_path / "pub" / MANIFEST).unlink()
    dump(inputs, uri)
    for pid, who in ((4321, "pid 4321"), (0, "another process")):
        monkeypatch.setattr(remote_mod, "writer_pid", lambda root, pid=pid: pid)
        with pytest.raises(UsageError) as e:
            materialize_store(uri, cache=tmp_path / "c")
        assert str(e.value) == (f"{uri} is being written on this machine by {who} (teacher-dump, staging in "
                                f"{tmp_path / 'c'}); wait for it to finish, then run this again")
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith("part-") or n == MANIFEST]  # nothing fetched


# ------------------------------------------------------------------ what the first run of mutmut left (note 17)


class _Broken:
    """A file system whose `fail` methods raise pyarrow's I/O error (a bucket gone, credentials expired), and that
    records every output stream's writes (the block sizes of an upload) and the keys it opens for writing."""

    def __init__(self, fs: pafs.FileSystem, fail: tuple[str, ...] = ()) -> None:
        self._fs, self.fail, self.blocks, self.opened = fs, fail, [], []

    def __getattr__(self, name):
        if name in self.fail:
            def boom(*args, **kwargs):
                raise pa.ArrowIOError(f"boom in {name}: the bucket went away")
            return boom
        return getattr(self._fs, name)

    def open_output_stream(self, key, *args, **kwargs):
        if "open_output_stream" in self.fail:
            raise pa.ArrowIOError("boom in open_output_stream: the bucket went away")
        self.opened.append(key)
        stream, blocks = self._fs.open_output_stream(key, *args, **kwargs), self.blocks

        class Recording:
            def __enter__(self):
                stream.__enter__()
                return self

            def __exit__(self, *exc):
                return stream.__exit__(*exc)

            def write(self, data):
                blocks.append(len(data))
                return stream.write(data)
        return Recording()


def test_every_remote_failure_is_a_usage_error_that_carries_pyarrows_reason(bucket, tmp_path: Path):
    """Each operation's message names what failed and keeps pyarrow's reason, which is what tells a user an
    expired credential from a missing bucket. Fails if an operation is named wrongly or not at all, or if the
    reason is dropped from the message."""
    r, d = bucket
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    (tmp_path / "dl").mkdir()
    cases = [("get_file_info", "list the store", lambda: r.list()),
             ("get_file_info", "read manifest.json", lambda: r.read_bytes(MANIFEST)),
             ("open_input_stream", "read a.bin", lambda: r.read_bytes("a.bin")),
             ("open_input_stream", "download a.bin", lambda: r.download("a.bin", tmp_path / "dl" / "a.bin")),
             ("open_output_stream", "upload obj.bin", lambda: r.upload(src, "obj.bin")),
             ("delete_file", "delete a.bin", lambda: r.delete("a.bin")),
             ("create_dir", "write there", lambda: r.check_writable())]
    real = r.fs
    for method, what, call in cases:
        r.fs = _Broken(real, (method,))
        with pytest.raises(UsageError) as e:
            call()
        assert str(e.value).startswith(f"{r.name}: cannot {what} (boom in {method}: the bucket went away); check "
                                       "the URI"), (method, str(e.value))
    r.fs = real
    with pytest.raises(UsageError) as e:
        r.download("missing.bin", tmp_path / "dl" / "x")
    assert f"{d}/missing.bin" in str(e.value)  # pyarrow's reason names the key


def test_the_upload_sends_the_fewest_blocks_that_stop_exactly_at_half(bucket, monkeypatch, tmp_path: Path):
    """Up to the half in blocks of at most _CHUNK, the last one cut to end at the half; after it, whole blocks.
    Fails if the half is computed otherwise (a third, a float half), if the block at the half is cut to one
    byte, or if after the half the data goes in one-byte blocks (the same bytes, but a call per byte)."""
    r, d = bucket
    real = r.fs
    for total, chunk in ((23, 4), (23, 5), (24, 4), (7, 100), (1, 4), (40, 3)):
        monkeypatch.setattr(remote_mod, "_CHUNK", chunk)
        src = tmp_path / f"src{total}.bin"
        src.write_bytes(bytes(range(total)))
        r.fs = _Broken(real)
        r.upload(src, "obj.bin", fault="mid-x")
        half = total // 2
        want = [chunk] * (half // chunk) + ([half % chunk] if half % chunk else [])
        rest = total - half
        want += [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])
        assert r.fs.blocks == want, (total, chunk, r.fs.blocks)
        assert (d / "obj.bin").read_bytes() == bytes(range(total))
    r.fs = real


def test_the_write_probe_is_a_temporary_object_that_the_next_writer_would_clean(bucket):
    """A kill between the probe's write and its delete leaves it at the prefix: it must be named like the
    writer's other temporary objects (`.NAME.tmp-PID`), which the next writer deletes. Fails if it is named
    otherwise, or left behind."""
    r, d = bucket
    r.fs = _Broken(r.fs)
    r.check_writable()
    [probe] = r.fs.opened
    assert probe == f"{d}/.write-probe.tmp-{os.getpid()}" and not os.path.exists(probe)


def test_paths_ending_in_other_characters_and_a_bucket_level_prefix(tmp_path: Path, cache: Path):
    """The prefix's trailing slashes only are stripped; a prefix right under the bucket names the directory
    after itself. Fails if more is stripped (here: a trailing X), or the last part is taken by position."""
    r = Remote(f"file://{tmp_path}/storeX//")
    assert r.path == f"{tmp_path}/storeX" and r.local_dir().name.startswith("storeX-")
    r.path = "bkt"  # what s3://bkt/ gives: no slash left in the path
    assert r.local_dir().name.startswith("bkt-")
    assert remote_mod._scrub("x p@ss y", "s3://me:p@ss@bkt/p") == "x *** y"  # a password holding an @
    assert display("s3://me:p@ss@bkt/p") == "s3://bkt/p"
    with pytest.raises(ValueError, match=r"^x.parquet: no gedistill key-value metadata$"):
        pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
        Remote(f"file://{tmp_path}").shard_meta("x.parquet")


def test_a_manifest_alone_identifies_the_store_and_shards_are_not_read_when_it_exists(ref, tmp_path: Path,
                                                                                       monkeypatch):
    """A run killed before its first shard leaves only a manifest: another setting must be refused on it alone.
    With a manifest, its settings are the store's: a listed shard replaced by one of other settings is
    recomputed, not taken as the store's settings (which would refuse a rerun of the right settings), and no
    shard's footer is read to decide."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri, seed=1, staging=tmp_path / "other")
    alien = (tmp_path / "pub" / SHARDS[0]).read_bytes()
    for name in [*SHARDS, CARD]:
        (tmp_path / "pub" / name).unlink()
    with pytest.raises(UsageError, match="Differences: seed: stored 1, now 0"):
        dump(inputs, uri)
    for p in (tmp_path / "pub").iterdir():
        p.unlink()
    dump(inputs, uri)
    (tmp_path / "pub" / SHARDS[0]).write_bytes(alien)
    read: list[str] = []
    real = Remote.shard_meta
    monkeypatch.setattr(Remote, "shard_meta", lambda self, name: read.append(name) or real(self, name))
    report = dump(inputs, uri, staging=tmp_path / "fresh")
    assert read == [] and report.shards_written == 1 and files(tmp_path / "pub") == want


def test_a_shard_found_bad_leaves_the_manifest_until_it_is_recomputed(ref, tmp_path: Path):
    """Between pending() and the recompute of a listed shard found bad, every manifest this writer uploads
    must leave it out: fails if the bad object stays listed (a reader would be sent to it) or if a good one
    drops out."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    (tmp_path / "pub" / SHARDS[2]).write_bytes(flipped(want[SHARDS[2]]))
    spec = spec_of(want[MANIFEST])
    w = RemoteWriter(uri, spec, staging=tmp_path / "fresh")
    assert w.pending() == [2]
    w.write_manifest()
    assert manifest_names((tmp_path / "pub" / MANIFEST).read_bytes()) == [SHARDS[0], SHARDS[1], SHARDS[3]]
    with pytest.raises(RuntimeError, match=rf"^{SHARDS[2]}: the staged shard is not sound; rerun teacher-dump$"):
        w._publish_shard(2)  # nothing staged for it (the 'never' branch)


def test_a_staged_complete_store_does_not_publish_its_card_with_an_incomplete_manifest(ref, tmp_path: Path):
    """The remote emptied while the staging directory still holds the whole store and its card: the first
    manifest the writer uploads lists nothing, and the card must not go up with it (a card names every shard).
    Fails if the card is uploaded before the store is complete there."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri, staging=tmp_path / "st")
    for p in (tmp_path / "pub").iterdir():
        p.unlink()
    spec = spec_of(want[MANIFEST])
    RemoteWriter(uri, spec, staging=tmp_path / "st")
    assert sorted(os.listdir(tmp_path / "pub")) == [MANIFEST]


def test_the_defaults_refuse_a_store_of_other_settings_and_name_at_most_five_foreign_objects(ref, tmp_path: Path):
    """open_writer and RemoteWriter refuse unless asked to replace; the refusal to replace names five foreign
    objects, and counts a hidden object that is not a temporary one as foreign."""
    inputs, want = ref
    uri = f"file://{tmp_path}/pub"
    dump(inputs, uri)
    other = spec_of(want[MANIFEST], seed=7)
    for make in (lambda: open_writer(uri, other, staging=tmp_path / "a"),
                 lambda: RemoteWriter(uri, other, staging=tmp_path / "b")):
        with pytest.raises(UsageError, match="refusing to mix them"):
            make()
    for n in ("f1", "f2", "f3", "f4", "f5", "f6"):
        (tmp_path / "pub" / n).write_text(n)
    with pytest.raises(UsageError) as e:
        RemoteWriter(uri, other, replace_mismatched=True, staging=tmp_path / "c")
    assert "(f1, f2, f3, f4, f5);" in str(e.value)
    for n in ("f1", "f2", "f3", "f4", "f5", "f6"):
        (tmp_path / "pub" / n).unlink()
    (tmp_path / "pub" / ".publisher-notes").write_text("mine")
    with pytest.raises(UsageError, match=r"\(\.publisher-notes\); not deleting it"):
        RemoteWriter(uri, other, replace_mismatched=True, staging=tmp_path / "d")
    assert files(tmp_path / "pub") == {**want, ".publisher-notes": b"mine"}
