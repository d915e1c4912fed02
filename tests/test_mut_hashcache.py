"""The teacher's file-hash cache (pipeline.teacher.hashcache), pinned where its mutants survived.

A teacher's identity in every store it writes is the sha256 of its files; the cache spares rehashing a 16 GB
model per run. A cache that answers for a file whose bytes changed would give a fine-tuned teacher its old
identity, and its old stores would be reused as if current. So each stamp field, the racy rule, the
"changed while read" rule, the reread before writing and a read-only cache are checked here directly (the
end-to-end tests are in tests/test_teacher_convert.py; `hash_calls`, the files actually read for hashing, is
in tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from pipeline.store import sha256_file
from pipeline.teacher import hashcache
from pipeline.teacher.hashcache import CACHE_FILE, RACY_NS, cached_sha256


def _old_file(path: Path, data: bytes, age_s: float = 60.0) -> Path:
    path.write_bytes(data)
    t = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(t, t))
    return path


def test_a_hit_returns_the_cached_digest_and_reads_nothing(tmp_path, hash_calls):
    f = _old_file(tmp_path / "w.bin", b"abc")
    cache = tmp_path / "cache"
    assert cached_sha256(f, cache) == sha256_file(f)
    entry = json.loads((cache / CACHE_FILE).read_text(encoding="utf-8"))[str(f.resolve())]
    st = f.stat()
    assert entry == {"stamp": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], "sha256": sha256_file(f)}
    hash_calls.clear()
    assert cached_sha256(f, cache) == sha256_file(f) and hash_calls == []
    assert [p.name for p in cache.iterdir()] == [CACHE_FILE]  # no temporary file left behind


def test_a_symlink_is_cached_under_the_file_it_points_to(tmp_path, hash_calls):
    f = _old_file(tmp_path / "w.bin", b"abc")
    link = tmp_path / "link.bin"
    link.symlink_to(f)
    cached_sha256(f, tmp_path / "cache")
    hash_calls.clear()
    assert cached_sha256(link, tmp_path / "cache") == sha256_file(f) and hash_calls == []


def test_new_bytes_with_the_old_size_and_mtime_are_rehashed(tmp_path, hash_calls):
    """Rewritten in place (same inode), then its mtime set back: only ctime tells, and it must."""
    f = _old_file(tmp_path / "w.bin", b"abc")
    cache = tmp_path / "cache"
    old = cached_sha256(f, cache)
    st = f.stat()
    time.sleep(0.01)  # a ctime the rewrite cannot share with the first write
    f.write_bytes(b"xyz")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    hash_calls.clear()
    assert cached_sha256(f, cache) == sha256_file(f) != old and hash_calls == ["w.bin"]


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3"])
def test_a_cache_file_that_is_json_but_not_a_mapping_is_ignored(tmp_path, content, hash_calls):
    f = _old_file(tmp_path / "w.bin", b"abc")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_text(content, encoding="utf-8")
    assert cached_sha256(f, tmp_path / "cache") == sha256_file(f)
    assert json.loads((tmp_path / "cache" / CACHE_FILE).read_text(encoding="utf-8"))[str(f.resolve())]["sha256"] \
        == sha256_file(f)


@pytest.mark.parametrize("entry", [{"stamp": None, "sha256": "0" * 64}, {"sha256": "0" * 64}, "0" * 64,
                                   {"stamp": "STAMP", "sha256": None}, {"stamp": "STAMP", "sha256": 7}])
def test_an_entry_without_a_matching_stamp_or_a_string_digest_is_not_used(tmp_path, entry, hash_calls):
    f = _old_file(tmp_path / "w.bin", b"abc")
    st = f.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if isinstance(entry, dict) and entry.get("stamp") == "STAMP":
        entry = {**entry, "stamp": stamp}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_text(json.dumps({str(f.resolve()): entry}), encoding="utf-8")
    assert cached_sha256(f, tmp_path / "cache") == sha256_file(f)
    assert hash_calls == ["w.bin"]


def test_a_forged_entry_with_the_right_stamp_is_trusted(tmp_path, hash_calls):
    """The other side of the test above: a matching stamp and a string digest are a hit, read from the cache
    (so the stamp comparison is what decides, not a reread)."""
    f = _old_file(tmp_path / "w.bin", b"abc")
    st = f.stat()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_text(json.dumps({str(f.resolve()): {
        "stamp": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], "sha256": "f" * 64}}), encoding="utf-8")
    assert cached_sha256(f, tmp_path / "cache") == "f" * 64 and hash_calls == []


@pytest.mark.parametrize(("age_s", "cached"), [(RACY_NS / 1e9 - 1.0, False), (RACY_NS / 1e9 + 1.0, True)])
def test_a_file_written_moments_ago_is_hashed_but_not_cached(tmp_path, age_s, cached):
    f = _old_file(tmp_path / "w.bin", b"abc", age_s=age_s)
    assert cached_sha256(f, tmp_path / "cache") == sha256_file(f)
    known = json.loads((tmp_path / "cache" / CACHE_FILE).read_text(encoding="utf-8")) \
        if (tmp_path / "cache" / CACHE_FILE).exists() else {}
    assert (str(f.resolve()) in known) is cached


def test_a_file_that_changes_while_it_is_read_is_not_cached(tmp_path, monkeypatch):
    f = _old_file(tmp_path / "w.bin", b"abc")
    real = hashcache.sha256_file

    def and_touch(path):
        digest = real(path)
        later = time.time_ns() - 30_000_000_000
        os.utime(path, ns=(later, later))  # another writer: the stamp moved during the read
        return digest

    monkeypatch.setattr(hashcache, "sha256_file", and_touch)
    assert cached_sha256(f, tmp_path / "cache") == real(f)
    assert not (tmp_path / "cache" / CACHE_FILE).exists()


def test_an_entry_another_process_added_meanwhile_is_kept(tmp_path, monkeypatch):
    """The cache is reread just before it is written: an entry written by another run while this one was
    hashing survives."""
    f = _old_file(tmp_path / "w.bin", b"abc")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CACHE_FILE).write_text(json.dumps({"/first": {"stamp": [1], "sha256": "a"}}), encoding="utf-8")
    real = hashcache.sha256_file

    def with_a_neighbour(path):
        (cache / CACHE_FILE).write_text(json.dumps({"/first": {"stamp": [1], "sha256": "a"},
                                                    "/other": {"stamp": [2], "sha256": "b"}}), encoding="utf-8")
        return real(path)

    monkeypatch.setattr(hashcache, "sha256_file", with_a_neighbour)
    cached_sha256(f, cache)
    assert set(json.loads((cache / CACHE_FILE).read_text(encoding="utf-8"))) == {"/first", "/other", str(f.resolve())}


def test_a_cache_that_cannot_be_written_costs_a_rehash_nothing_else(tmp_path, caplog):
    f = _old_file(tmp_path / "w.bin", b"abc")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="pipeline.teacher.hashcache"):
        assert cached_sha256(f, blocker / "cache") == sha256_file(f)
    [record] = [r for r in caplog.records if r.name == "pipeline.teacher.hashcache"]
    assert record.getMessage().startswith(f"could not cache the sha256 of w.bin in {blocker / 'cache' / CACHE_FILE}: ")
    assert "File exists" in record.getMessage() or "Not a directory" in record.getMessage()


def test_a_cache_directory_is_created_with_its_parents(tmp_path):
    f = _old_file(tmp_path / "w.bin", b"abc")
    cache = tmp_path / "a" / "b" / "cache"
    cached_sha256(f, cache)
    assert str(f.resolve()) in json.loads((cache / CACHE_FILE).read_text(encoding="utf-8"))


@pytest.mark.parametrize(("extra", "logged"), [(0, False), (1, True)])
def test_hashing_a_file_over_a_gigabyte_says_so_once(tmp_path, monkeypatch, caplog, extra, logged):
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:  # sparse: no gigabyte written
        fh.truncate((1 << 30) + extra)
    t = time.time_ns() - 60_000_000_000
    os.utime(f, ns=(t, t))
    monkeypatch.setattr(hashcache, "sha256_file", lambda path: "0" * 64)  # nor read
    with caplog.at_level(logging.INFO, logger="pipeline.teacher.hashcache"):
        cached_sha256(f, tmp_path / "cache")
    want = f"hashing {f.resolve()} (1.1 GB) once; later runs reuse the result"
    assert [r.getMessage() for r in caplog.records if r.name == "pipeline.teacher.hashcache"] == ([want] if logged else [])
