"""The teacher store, where mutation testing found the suite blind (docs/MUTATION.md): shard ranges as
a property (hypothesis), the format's helpers against hand-made cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.store_format import (MANIFEST, StoreSpec, canonical_json, diff_settings, fingerprint_of,
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
from pipeline.store_format import decodes  # noqa: E402
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
    with caplog.at_level("WARNING", logger="pipeline.store_format"):
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
