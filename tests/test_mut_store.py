"""The teacher store, where mutation testing found the suite blind (docs/MUTATION.md): shard ranges as
a property (hypothesis), the format's helpers against hand-made cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.store.format import (MANIFEST, StoreSpec, canonical_json, diff_settings, fingerprint_of,
                                   read_manifest_file, sha256_file, shard_name, store_schema)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.integers(0, 5000), st.integers(1, 700))
def test_shard_ranges_partition_the_samples(n_samples, shard_rows):
    """Fails if shard ranges overlap, leave a gap, run past the last sample, hold more than shard_rows,
    or if the shard count is not the smallest that covers every sample (at least one shard)."""
    spec = StoreSpec(settings={}, n_samples=n_samples, shard_rows=shard_rows, hidden_size=4)
    ranges = [spec.shard_range(i) for i in range(spec.n_shards)]
    assert spec.n_shards == max(1, -(-n_samples // shard_rows))
    assert ranges[0][0] == 0 and ranges[-1][1] == n_samples
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 == b0  # contiguous, disjoint
    for start, stop in ranges:
        assert 0 < stop - start <= shard_rows or n_samples == 0
    for i, (start, stop) in enumerate(ranges):
        meta = spec.shard_meta(i)
        assert (meta["shard"], meta["n_shards"], meta["start"], meta["stop"]) == (i, spec.n_shards, start, stop)


def test_shard_meta_carries_the_facts_that_make_a_shard_self_describing():
    """Fails if a shard's metadata drops or mislabels the schema version, fingerprint, settings,
    width or h_dec dtype."""
    spec = StoreSpec(settings={"mode": "first-token", "k": 8}, n_samples=10, shard_rows=4, hidden_size=16,
                     h_dec_dtype="float32")
    assert spec.shard_meta(2) == {
        "schema_version": 1, "fingerprint": fingerprint_of({"mode": "first-token", "k": 8}),
        "settings": {"mode": "first-token", "k": 8}, "shard": 2, "n_shards": 3, "start": 8, "stop": 10,
        "hidden_size": 16, "h_dec_dtype": "float32"}
    assert StoreSpec(settings={}, n_samples=1, shard_rows=1, hidden_size=2).h_dec_dtype == "float16"


def test_shard_names_sort_in_shard_order():
    """Fails if the zero-padded name changes: lexical order of the files must be shard order."""
    assert shard_name(3, 16) == "part-00003-of-00016.parquet"
    names = [shard_name(i, 120) for i in range(120)]
    assert sorted(names) == names


def test_fingerprint_is_sha256_of_canonical_json():
    """Fails if key order, whitespace or non-ASCII escaping changes the fingerprint (it must identify
    the settings, not their spelling), or if the hash is not sha256 of that canonical text."""
    a = {"b": 1, "a": {"y": "é", "x": [1, 2]}}
    b = {"a": {"x": [1, 2], "y": "é"}, "b": 1}
    assert canonical_json(a) == '{"a":{"x":[1,2],"y":"é"},"b":1}'
    assert fingerprint_of(a) == fingerprint_of(b) == hashlib.sha256(canonical_json(a).encode()).hexdigest()
    assert fingerprint_of(a) != fingerprint_of({**a, "b": 2})


def test_sha256_file_reads_past_one_block(tmp_path: Path):
    """Fails if the file hash stops before the end (block loop) or hashes something else."""
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB block
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_settings_differences_are_listed_by_dotted_key():
    """Fails if nested keys are not flattened with dots, a key present on one side only is missed,
    values are not shown with repr, or long values are not cut at 60 characters."""
    stored = {"mode": "generate", "teacher": {"name": "a", "dtype": "bf16"}, "k": 8, "long": "x" * 70}
    current = {"mode": "first-token", "teacher": {"name": "a", "dtype": "f32"}, "extra": True, "long": "x" * 70}
    assert diff_settings(stored, current) == [
        "extra: stored None, now True",
        "k: stored 8, now None",
        "mode: stored 'generate', now 'first-token'",
        "teacher.dtype: stored 'bf16', now 'f32'",
    ]
    cut = diff_settings({"v": "y" * 70}, {"v": "z"})[0]
    assert cut == "v: stored '" + "y" * 59 + "..., now 'z'"
    assert diff_settings(stored, stored) == []


def test_manifest_missing_torn_or_not_an_object_reads_as_empty(tmp_path: Path):
    """Fails if a missing, torn or non-object manifest raises instead of reading as {} (it is rebuilt
    from the shards), or if a good manifest is not read as UTF-8 JSON."""
    assert read_manifest_file(tmp_path) == {}
    (tmp_path / MANIFEST).write_text('{"schema_version": 1, "n', encoding="utf-8")
    assert read_manifest_file(tmp_path) == {}
    (tmp_path / MANIFEST).write_text("[1, 2]", encoding="utf-8")
    assert read_manifest_file(tmp_path) == {}
    (tmp_path / MANIFEST).write_bytes(json.dumps({"teacher": "é"}, ensure_ascii=False).encode("utf-8"))
    assert read_manifest_file(tmp_path) == {"teacher": "é"}


def test_schema_types():
    """Fails if a column's type changes: stage two reads these exact types."""
    s = store_schema(8)
    assert str(s.field("h_dec").type) == "fixed_size_list<item: halffloat>[8]"
    assert str(store_schema(8, "float32").field("h_dec").type) == "fixed_size_list<item: float>[8]"
    assert [str(s.field(c).type) for c in ("sample_id", "user_idx", "position", "target", "ranking", "scores",
                                           "status", "prompt_tokens", "truncated")] == [
        "int64", "int32", "int32", "int32", "list<item: int16>", "list<item: float>", "string", "int32", "bool"]
    with pytest.raises(KeyError):
        store_schema(8, "bfloat16")


# ---------------------------------------------------------------- reading, decoding, replacing

from pipeline.errors import UsageError  # noqa: E402
from pipeline.store import StoreInfo, iter_batches, open_store  # noqa: E402
from pipeline.store.format import decodes  # noqa: E402
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump  # noqa: E402
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> Path:
    out = tmp_path / "store"
    run_dump(DumpConfig(shard_rows=3), load_inputs(*make_inputs(tmp_path / "in")), FakeBackend(), FAKE_TEACHER, out)
    return out


def test_decodes_tells_a_good_shard_from_a_torn_or_flipped_one(store: Path, caplog):
    """Fails if a truncated shard, or one with a flipped byte in a data page, is reported as decoding
    (the writer then keeps it as done), or a good one as not; or if the warning stops naming the file."""
    shard = sorted(store.glob("part-*.parquet"))[0]
    assert decodes(shard)
    data = shard.read_bytes()
    torn = store.parent / "torn.parquet"
    torn.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="pipeline.store.format"):
        assert not decodes(torn)
    assert "torn.parquet does not decode (" in caplog.text
    flipped = store.parent / "flipped.parquet"
    raw = bytearray(data)
    raw[len(raw) // 3] ^= 0xFF  # inside the column chunks: caught by the page checksums
    flipped.write_bytes(bytes(raw))
    assert not decodes(flipped)


def test_iter_batches_streams_a_store_info_and_a_path_without_rehashing(store: Path):
    """Fails if iter_batches cannot take the StoreInfo it documents, or re-verifies every shard's sha256
    when given a path (callers verify once with open_store; streaming must not hash the store again)."""
    info = open_store(store)
    assert isinstance(info, StoreInfo)
    ids = [i for b in iter_batches(info, ["sample_id"]) for i in b.column("sample_id").to_pylist()]
    assert ids == list(range(10))
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # verification would refuse the store now
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError):
        open_store(store)
    ids = [i for b in iter_batches(store, ["sample_id"]) for i in b.column("sample_id").to_pylist()]
    assert ids == list(range(10))


def test_iter_batches_default_batch_is_1024_rows(tmp_path: Path):
    """Fails if the default batch size changes (memory per batch is bounded by it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.table({"sample_id": pa.array(range(1500), pa.int64())}), shard)
    info = StoreInfo(tmp_path, {}, (shard,))
    assert [b.num_rows for b in iter_batches(info, ["sample_id"])] == [1024, 476]


def test_replacing_a_store_never_deletes_foreign_parquet_or_part_files(store: Path):
    """Fails if a file is taken for a shard because it merely starts with 'part-' or ends in '.parquet':
    replacing a mismatched store must refuse instead of deleting someone's results.parquet."""
    inputs = load_inputs(*make_inputs(store.parent / "in2"))
    for name in ("results.parquet", "part-notes.txt"):
        (store / name).write_text("mine")
        with pytest.raises(UsageError, match=rf"also other files \({name}\)"):
            run_dump(DumpConfig(shard_rows=4, seed=9, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER,
                     store)
        assert (store / name).read_text() == "mine"
        (store / name).unlink()


# ---------------------------------------------------------------- merge refusals, replacement under a lock

import subprocess  # noqa: E402
import sys  # noqa: E402

from pipeline.data.prepared import load_prepared  # noqa: E402
from pipeline.store.check import verify_store  # noqa: E402
from pipeline.store.merge import merge_stores  # noqa: E402

MERGE_HINT = ". Rerun the worker(s) concerned with the same options (bad shards are recomputed), then merge again."


def _workers(tmp_path: Path, shard_rows: int = 3) -> list[Path]:
    inputs = load_inputs(*make_inputs(tmp_path / "in"))
    parts = []
    for i in range(2):
        out = tmp_path / f"w{i}"
        run_dump(DumpConfig(shard_rows=shard_rows, num_workers=2, worker_index=i), inputs, FakeBackend(),
                 FAKE_TEACHER, out)
        parts.append(out)
    return parts


def _break_digests(store: Path, n: int) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    for s in manifest["shards"][:n]:
        s["sha256"] = "0" * 64
    (store / MANIFEST).write_text(json.dumps(manifest))


def test_merge_lists_the_problems_of_every_source(tmp_path: Path):
    """Fails if a bad source's problems replace another's instead of adding up, or the refusal stops
    naming each problem under its source with what to do."""
    parts = _workers(tmp_path)
    for p in parts:
        _break_digests(p, 1)
    expected = [f"{p}/{x}" for p in parts for x in verify_store(p, partial=True)]
    assert len(expected) == 2
    with pytest.raises(UsageError) as e:
        merge_stores(tmp_path / "out", parts)
    assert str(e.value) == "refusing to merge: 2 problem(s) in the sources: " + "; ".join(expected) + MERGE_HINT


@pytest.mark.parametrize("n_bad, suffix", [(8, ""), (9, "; ...")])
def test_merge_lists_at_most_eight_problems(tmp_path: Path, n_bad, suffix):
    """Fails if the refusal lists more than 8 problems, or marks a list of exactly 8 as cut."""
    parts = _workers(tmp_path, shard_rows=1)  # 10 shards, 5 per worker
    _break_digests(parts[0], 5)
    _break_digests(parts[1], n_bad - 5)
    problems = [f"{p}/{x}" for p in parts for x in verify_store(p, partial=True)]
    assert len(problems) == n_bad
    with pytest.raises(UsageError) as e:
        merge_stores(tmp_path / "out", parts)
    assert str(e.value) == (f"refusing to merge: {n_bad} problem(s) in the sources: " + "; ".join(problems[:8])
                            + suffix + MERGE_HINT)


def test_merge_checks_the_sources_against_the_given_prepared_data(tmp_path: Path):
    """Fails if merge ignores `prepared`: sources made from another dataset must be refused."""
    parts = _workers(tmp_path)
    other = load_prepared(make_inputs(tmp_path / "other", seed=5)[0])
    with pytest.raises(UsageError, match="made from other prepared data"):
        merge_stores(tmp_path / "out", parts, prepared=other)
    same = load_prepared(tmp_path / "in" / "prepared")
    assert merge_stores(tmp_path / "out", parts, prepared=same)["complete"]


def test_merge_of_a_directory_without_manifest_says_what_it_expected(tmp_path: Path):
    """Fails if a wrong source directory gives another message than the missing manifest."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        merge_stores(tmp_path / "out", [tmp_path / "empty"])
    assert str(e.value) == f"{tmp_path / 'empty'}: no {MANIFEST}; is it a teacher-dump --out directory?"


def test_settings_values_are_cut_after_60_characters_exactly():
    """Fails if a value whose repr is exactly 60 characters gets '...', or one of 61 does not."""
    sixty, sixty_one = "a" * 58, "a" * 59  # repr adds the two quotes
    assert diff_settings({"v": sixty}, {"v": 1}) == [f"v: stored {sixty!r}, now 1"]
    assert diff_settings({"v": sixty_one}, {"v": 1}) == [f"v: stored {sixty_one!r:.60}..., now 1"]


def test_replacement_names_at_most_five_foreign_files_and_logs_the_store(store: Path, caplog):
    """Fails if the refusal lists other than the first five foreign files, comma-separated, or the
    replacement warning stops naming the store directory."""
    inputs = load_inputs(*make_inputs(store.parent / "in2"))
    names = [f"f{i}.txt" for i in range(6)]
    for name in names:
        (store / name).write_text("mine")
    with pytest.raises(UsageError, match=r"also other files \(f0.txt, f1.txt, f2.txt, f3.txt, f4.txt\); not deleting"):
        run_dump(DumpConfig(shard_rows=4, seed=9, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER, store)
    for name in names:
        (store / name).unlink()
    with caplog.at_level("WARNING", logger="pipeline.store"):
        run_dump(DumpConfig(shard_rows=4, seed=9, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER, store)
    assert f"{store}: replacing a teacher store made with other settings (" in caplog.text


def test_a_store_in_use_by_another_writer_is_not_replaced(store: Path):
    """Fails if replacing a mismatched store takes the run lock shared instead of exclusive: another
    process still writing the old store (here one holding the shared run lock) must make it refuse."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 0)\n"
         "print('locked', flush=True)\ntime.sleep(60)\n", str(store / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        inputs = load_inputs(*make_inputs(store.parent / "in2"))
        with pytest.raises(UsageError, match=rf"is in use by pid {holder.pid} .*cannot delete and replace it"):
            run_dump(DumpConfig(shard_rows=4, seed=9, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER,
                     store)
        assert len(list(store.glob("part-*.parquet"))) == 4  # the old store is intact
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- open_store's refusals, merge without rehashing

def test_open_store_refusals_say_what_is_wrong_and_what_to_do(store: Path):
    """Fails if open_store's messages for a missing, unreadable or newer-version manifest stop naming
    the file, the error or the versions."""
    missing = store.parent / "nothing"
    missing.mkdir()
    with pytest.raises(UsageError) as e:
        open_store(missing)
    assert str(e.value) == f"{missing} is not a teacher store (no {MANIFEST}); run `gedistill teacher-dump --out {missing}`"
    good = (store / MANIFEST).read_text()
    (store / MANIFEST).write_text("{not json")
    with pytest.raises(UsageError, match=rf"^{store / MANIFEST} is unreadable or not a store manifest \(JSONDecodeError: "):
        open_store(store)
    manifest = json.loads(good)
    manifest["schema_version"] = 2
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError) as e:
        open_store(store)
    assert str(e.value) == f"{store}: store schema version 2, this gedistill reads 1"


@pytest.mark.parametrize("n_bad, suffix", [(3, ""), (8, ""), (9, "; ...")])
def test_open_store_lists_at_most_eight_problems(tmp_path: Path, n_bad, suffix):
    """Fails if a refused store's message lists more than 8 problems, marks exactly 8 as cut, or stops
    saying how to see all of them and how to recompute."""
    out = tmp_path / "s"
    run_dump(DumpConfig(shard_rows=1), load_inputs(*make_inputs(tmp_path / "in")), FakeBackend(), FAKE_TEACHER, out)
    _break_digests(out, n_bad)
    problems = verify_store(out)
    assert len(problems) == n_bad
    with pytest.raises(UsageError) as e:
        open_store(out)
    assert str(e.value) == (f"{out} fails verification, refusing to use it ({n_bad} problem(s)): "
                            + "; ".join(problems[:8]) + suffix + f". See `gedistill cache verify {out}`; rerun "
                            "teacher-dump with the same options to recompute bad shards.")


def test_decode_warning_is_one_line_naming_the_file(store: Path, caplog):
    """Fails if the warning for an undecodable shard changes its wording."""
    torn = store.parent / "torn.parquet"
    torn.write_bytes(sorted(store.glob("part-*.parquet"))[0].read_bytes()[:100])
    with caplog.at_level("WARNING", logger="pipeline.store.format"):
        decodes(torn)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["torn.parquet does not decode"]
    assert caplog.records[0].getMessage().endswith(")")


def test_merge_does_not_rehash_the_shards_it_copied(tmp_path: Path, monkeypatch):
    """Fails if the merged manifest re-reads every copied shard for its sha256 instead of taking the
    digest already checked on the copy (note_digest): a merge of a large store would hash it twice."""
    import pipeline.store as store_mod

    parts = _workers(tmp_path)
    calls = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    assert merge_stores(tmp_path / "out", parts)["complete"]
    assert calls == []


def test_merge_refuses_sources_with_different_settings_and_records_its_sources(tmp_path: Path):
    """Fails if stores made with different settings are merged, the refusal stops naming the fingerprints,
    or the merged manifest does not record where its shards came from."""
    parts = _workers(tmp_path)
    other = tmp_path / "other"
    run_dump(DumpConfig(shard_rows=3, seed=7, num_workers=2, worker_index=1),
             load_inputs(*make_inputs(tmp_path / "in")), FakeBackend(), FAKE_TEACHER, other)
    fps = sorted(json.loads((p / MANIFEST).read_text())["fingerprint"][:12] for p in (parts[0], other))
    with pytest.raises(UsageError) as e:
        merge_stores(tmp_path / "bad", [parts[0], other])
    assert str(e.value) == f"the sources were made with different settings (fingerprints {fps}); they cannot be merged"
    merged = merge_stores(tmp_path / "out", parts)
    assert merged["run"]["merged_from"] == [str(p) for p in parts]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["run"]["merged_from"] == [str(p) for p in parts]


def test_verify_names_a_newer_schema_and_a_shard_listed_twice(store: Path):
    """Fails if verify_store's problems stop naming the manifest's schema version, or a shard the
    manifest lists twice (as opposed to one outside the layout)."""
    good = json.loads((store / MANIFEST).read_text())
    newer = {**good, "schema_version": 2}
    (store / MANIFEST).write_text(json.dumps(newer))
    assert verify_store(store) == [f"{MANIFEST}: schema version 2, expected 1"]
    twice = {**good, "shards": good["shards"] + good["shards"][:1]}
    (store / MANIFEST).write_text(json.dumps(twice))
    assert f"{MANIFEST}: lists {good['shards'][0]['name']} twice" in verify_store(store)
