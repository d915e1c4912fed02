"""`cache verify` (pipeline.store.check) word for word: each problem it reports names the file, what is wrong
and how much of it, so that a user can tell one damage from another without reading the code
(docs/MUTATION.md: the verifier's score was 68%; the corruption campaign checks that a damage is caught and
which file is named, not the count or the wording). Fake teacher; 10 samples."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.prepared import load_prepared
from pipeline.errors import UsageError
from pipeline.store import MANIFEST, fingerprint_of
from pipeline.store.check import rankings_are_permutations, verify_store
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from pipeline.teacher.parse import STATUSES
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs
from tests.test_mut_store_writer import rewrite_with_other_scores, synthetic_table
from tests.test_store_corruption import _edit_manifest, _rewrite, _seal, _set, column_offset

SHARDS = [f"part-0000{i}-of-00004.parquet" for i in range(4)]
ONE = "part-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """prepared dir, a store in 4 shards of 3, 3, 3, 1, the same samples in one shard of 10, and another
    prepared dataset."""
    root = tmp_path_factory.mktemp("check")
    prepared, cands = make_inputs(root / "in")
    inputs = load_inputs(prepared, cands)
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, root / "four")
    run_dump(DumpConfig(shard_rows=10), inputs, FakeBackend(), FAKE_TEACHER, root / "one")
    other, _ = make_inputs(root / "in-other", seed=1)
    return prepared, root / "four", root / "one", other


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_several_bad_rows_of_each_kind_in_one_shard_are_counted_and_named(made, tmp_path):
    """A sealed shard (its sha256 updated) with rows swapped, two rankings that are not permutations (one
    too short), three candidate/score lists without K entries, two unknown statuses, two non-finite h_dec
    and three rows that are not the prepared data's (a user, a position one past the last; a target), beside
    a valid row at position 0. Fails if a count is off (a kind counted once per shard or per batch), a kind
    is dropped, a bound is off by one, or a message changes."""
    prepared, _, one, _ = made
    store = copy(one, tmp_path / "s")

    def change(t: pa.Table) -> pa.Table:
        ids = t.column("sample_id").to_pylist()
        ids[2], ids[3] = ids[3], ids[2]
        ranking = t.column("ranking").to_pylist()
        ranking[0] = [0, 0] + ranking[0][2:]
        ranking[3] = ranking[3][:-1]
        cands = t.column("candidates").to_pylist()
        cands[1], cands[2] = cands[1][:-1], cands[2][:-1]
        scores = t.column("scores").to_pylist()
        scores[4] = scores[4] + [0.0]
        status = t.column("status").to_pylist()
        status[5] = status[6] = "weird"
        h = np.stack(t.column("h_dec").to_pylist()).astype(np.float16)
        h[7, 0], h[8, 3] = np.nan, np.inf
        users, targets, pos = (t.column(c).to_pylist() for c in ("user_idx", "target", "position"))
        train = load_prepared(prepared).train
        pos[0], targets[0] = 0, int(train[users[0]][0])  # the first position: a valid row
        users[1] = len(train)  # one past the last user
        pos[8] = len(train[users[8]])  # one past the user's last position
        targets[9] += 1000
        for name, values in (("sample_id", ids), ("ranking", ranking), ("candidates", cands), ("scores", scores),
                             ("status", status), ("user_idx", users), ("target", targets), ("position", pos)):
            t = _set(t, name, pa.array(values, t.schema.field(name).type))
        return _set(t, "h_dec", pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), h.shape[1]))

    _rewrite(store, ONE, change)
    assert verify_store(store, load_prepared(prepared)) == [
        f"{ONE}: sample_id not contiguous from 0 (rows permuted or duplicated?)",
        f"{ONE}: 2 ranking(s) are not permutations of 0..7",
        f"{ONE}: 3 candidates/scores list(s) without K=8 entries",
        f"{ONE}: 2 row(s) with a status other than {', '.join(STATUSES)}",
        f"{ONE}: 2 row(s) with a non-finite h_dec",
        f"{ONE}: 3 row(s) whose user/position/target are not in the given prepared data",
    ]


def test_rankings_are_permutations_row_by_row_on_both_paths():
    """Fails if the equal-length fast path or the ragged path misjudges a row: the first, a middle or the
    last one, a repeated index, an index out of range, or a list of the wrong length."""
    t = pa.list_(pa.int16())
    assert rankings_are_permutations(pa.array([[0, 0, 1], [2, 0, 1], [0, 1, 3], [1, 2, 0]], t), 3).tolist() == \
        [False, True, False, True]
    assert rankings_are_permutations(pa.array([[0, 0, 1], [1, 0], [2, 1, 0], [0, 1, 2, 3], [1, 1, 1]], t), 3).tolist() \
        == [False, False, True, False, False]
    assert rankings_are_permutations(pa.array([[1, 0, 2], [0, 1]], t), 3).tolist() == [True, False]


def _json(store: Path, text: str) -> None:
    (store / MANIFEST).write_text(text, encoding="utf-8")


def _drop(*keys: str) -> Callable[[dict], None]:
    return lambda m: [m.pop(k) for k in keys]


def _set_key(key: str, value) -> Callable[[dict], None]:
    return lambda m: m.update({key: value})


MALFORMED = f"{MANIFEST}: malformed (missing or invalid: dtype, sizes, k or shard entries)"


@pytest.mark.parametrize("edit, expected", [
    (_drop("hidden_size", "shards"), [f"{MANIFEST}: malformed (missing or invalid: hidden_size, shards)"]),
    (_set_key("settings", []), [f"{MANIFEST}: malformed (missing or invalid: settings)"]),
    (_set_key("h_dec_dtype", "bfloat16"), [MALFORMED]),
    (_set_key("shard_rows", 0), [MALFORMED]),
    (_set_key("n_samples", 0), [MALFORMED]),
    (_set_key("hidden_size", 0), [MALFORMED]),
    (lambda m: m["settings"].update(k="8"), [MALFORMED]),
    (lambda m: m["shards"][1].pop("sha256"), [MALFORMED]),
    (lambda m: m["shards"].__setitem__(2, "part-00002-of-00004.parquet"), [MALFORMED]),
    (_set_key("n_shards", 5), [f"{MANIFEST}: n_shards 5, the layout has 4"]),
    (_set_key("complete", False), [f"{MANIFEST}: store is incomplete: 4 of 4 shards listed"]),
    (lambda m: [e.pop(k) for e in m["shards"] for k in ("index", "size")], []),
    (lambda m: m["settings"].update(seed=7), [f"{MANIFEST}: fingerprint does not match its settings (edited by hand?)"]
     + [f"{s}: fingerprint in the shard metadata differs from the manifest (a shard of another store?)" for s in SHARDS]),
], ids=["missing", "settings-not-object", "dtype", "shard-rows", "n-samples", "hidden-size", "k", "entry-key",
        "entry-not-object", "n-shards", "not-complete", "minimal-entries", "fingerprint"])
def test_a_malformed_or_inconsistent_manifest_is_named_exactly(made, tmp_path, edit, expected):
    """Fails if a manifest problem is missed, reported in other words, or if the malformed manifest's missing
    fields are not listed by name (in the manifest's order) where they are known; or if shard entries with
    only the keys a reader needs (name, rows, sha256) are called malformed."""
    _, four, _, _ = made
    store = copy(four, tmp_path / "s")
    _edit_manifest(store, edit)
    assert verify_store(store) == expected


def test_layout_facts_that_contradict_the_settings_are_named(made, tmp_path):
    """Fails if the manifest's own n_samples, shard_rows, h_dec dtype or width may contradict its settings
    (or the teacher's width) without a problem naming both values."""
    _, four, _, _ = made
    for key, value, text in (("n_samples", 11, "n_samples 11 but the settings say 10"),
                             ("shard_rows", 2, "shard_rows 2 but the settings say 3"),
                             ("h_dec_dtype", "float32", "h_dec_dtype float32 but the settings say float16"),
                             ("hidden_size", 9, "hidden_size 9 but the teacher's is 16")):
        store = copy(four, tmp_path / key)

        def edit(m, key=key, value=value):
            m[key] = value
            if key == "shard_rows":
                m["n_shards"] = 5
        _edit_manifest(store, edit)
        problems = verify_store(store)
        assert f"{MANIFEST}: {text}" in problems, problems


def test_unreadable_or_non_object_manifest(made, tmp_path):
    """Fails if a torn manifest raises, or is reported without the exception's type, or a JSON list is
    read as a manifest."""
    _, four, _, _ = made
    store = copy(four, tmp_path / "s")
    _json(store, "[1, 2]")
    assert verify_store(store) == [f"{MANIFEST}: not a JSON object"]
    _json(store, '{"schema_version": 1, "n')
    [problem] = verify_store(store)
    assert problem.startswith(f"{MANIFEST}: unreadable (JSONDecodeError: ") and \
        problem.endswith("); not a complete teacher store")


def test_listing_and_files_problems_are_named_with_the_file(made, tmp_path):
    """An entry outside the layout, a listed shard missing, an unlisted shard present, a foreign shard
    file, other prepared data. Fails if one is missed, named otherwise, or if a partial store (a worker's
    share) is called incomplete."""
    prepared, four, _, other = made
    store = copy(four, tmp_path / "s")
    shutil.copyfile(store / SHARDS[0], store / "part-00004-of-00005.parquet")
    (store / SHARDS[1]).unlink()

    def edit(m):
        m["shards"] = [s for s in m["shards"] if s["name"] != SHARDS[2]]
        m["shards"].append({**m["shards"][0], "name": "part-00009-of-00009.parquet"})
        m["complete"] = False
    _edit_manifest(store, edit)
    head = [f"{MANIFEST}: lists part-00009-of-00009.parquet outside the layout"]
    files = ["part-00004-of-00005.parquet: unexpected shard file (another layout or another store?)",
             f"{SHARDS[1]}: missing",
             f"{SHARDS[2]}: present but not listed in the manifest (rerun its teacher-dump to list it)"]
    assert verify_store(store, partial=True) == head + files
    assert verify_store(store) == head + [f"{MANIFEST}: store is incomplete: 3 of 4 shards listed"] + files
    mine, theirs = load_prepared(prepared).fingerprint, load_prepared(other).fingerprint
    assert f"{MANIFEST}: made from other prepared data (prepared fingerprint {mine[:16]}, the given data " \
           f"{theirs[:16]})" in verify_store(store, load_prepared(other), partial=True)


def test_a_sound_shard_in_the_wrong_place_is_named_by_what_is_wrong(made, tmp_path):
    """Shard 1's bytes under shard 0's name, then shard 3's (1 row) under shard 1's, each sealed in the
    manifest; a shard with another h_dec width; then a shard of another store. Fails if the layout metadata,
    the row counts, the schema or the foreign fingerprint go unnamed, or a message changes."""
    _, four, _, _ = made
    store = copy(four, tmp_path / "s")
    shutil.copyfile(store / SHARDS[1], store / SHARDS[0])
    _seal(store, SHARDS[0])
    assert verify_store(store) == [f"{SHARDS[0]}: shard metadata does not match its place in the layout",
                                   f"{SHARDS[0]}: sample_id not contiguous from 0 (rows permuted or duplicated?)"]
    shutil.copyfile(four / SHARDS[0], store / SHARDS[0])
    _seal(store, SHARDS[0])
    shutil.copyfile(store / SHARDS[3], store / SHARDS[1])
    _seal(store, SHARDS[1])
    assert verify_store(store) == [f"{SHARDS[1]}: shard metadata does not match its place in the layout",
                                   f"{SHARDS[1]}: 1 rows, manifest says 3, layout says 3",
                                   f"{SHARDS[1]}: sample_id not contiguous from 3 (rows permuted or duplicated?)"]
    shutil.copyfile(four / SHARDS[1], store / SHARDS[1])
    _seal(store, SHARDS[1])
    w = pa.array([[0.0] * 8] * 3, pa.list_(pa.float16(), 8))
    _rewrite(store, SHARDS[2], lambda t: _set(t, "h_dec", w))
    [problem] = verify_store(store)
    assert problem.startswith(f"{SHARDS[2]}: schema differs from the expected one (h_dec float16 x 16): sample_id: ")
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    settings = {**m["settings"], "seed": 7}
    _edit_manifest(store, lambda m: m.update(settings=settings, fingerprint=fingerprint_of(settings)))
    assert verify_store(store)[0] == f"{SHARDS[0]}: fingerprint in the shard metadata differs from the manifest " \
                                     "(a shard of another store?)"


def test_a_one_sample_store_is_sound(tmp_path):
    """Fails if the smallest valid layout (one sample, one row per shard) is called malformed."""
    inputs = load_inputs(*make_inputs(tmp_path / "in", n_users=1, per_user=1))
    run_dump(DumpConfig(shard_rows=1), inputs, FakeBackend(), FAKE_TEACHER, tmp_path / "s")
    assert verify_store(tmp_path / "s") == []


def test_a_shard_of_three_record_batches_is_checked_across_them(tmp_path):
    """verify_store streams a shard 1,024 rows at a time. Fails if sample ids are not followed across batches
    (a contiguous shard of 2,100 rows then reads as permuted) or if the bad rows of each kind found in the
    first and the third batch are not added up (one user whose 2,100 training positions are the rows)."""
    import polars as pl

    from pipeline.data.prepared import write_prepared
    from pipeline.store import StoreSpec, StoreWriter

    n = 2100
    items = pl.DataFrame({"item_idx": np.arange(1, n + 3), "item_id": [f"i{i}" for i in range(1, n + 3)],
                          "title": [f"t{i}" for i in range(1, n + 3)], "text": [""] * (n + 2)})
    seqs = pl.DataFrame([{"user_idx": 0, "user_id": "u0", "train": list(range(1, n + 1)), "valid": n + 1,
                          "test": n + 2}])
    write_prepared(tmp_path / "prepared", seqs, items, {})
    prepared = load_prepared(tmp_path / "prepared")
    out = tmp_path / "s"
    w = StoreWriter(out, StoreSpec({"k": 2, "prepared_fingerprint": prepared.fingerprint}, n_samples=n, shard_rows=n,
                                   hidden_size=2))
    table = _set(synthetic_table(n), "position", pa.array(np.arange(n), pa.int32()))
    table = _set(table, "target", pa.array(np.arange(1, n + 1), pa.int32()))
    w.write_shard(0, table)
    w.write_manifest()
    assert verify_store(out, prepared) == []

    def bad(column: str, value, kind=None):
        values = table.column(column).to_pylist()
        values[5] = values[2090] = value
        return pa.array(values, kind or table.schema.field(column).type)
    for column, value in (("ranking", [1, 1]), ("status", "weird"), ("h_dec", [float("nan"), 0.0]), ("target", 0)):
        table = _set(table, column, bad(column, value))
    w.write_shard(0, table)
    w.write_manifest()
    assert verify_store(out, prepared) == [
        f"{ONE}: 2 ranking(s) are not permutations of 0..1",
        f"{ONE}: 2 row(s) with a status other than {', '.join(STATUSES)}",
        f"{ONE}: 2 row(s) with a non-finite h_dec",
        f"{ONE}: 2 row(s) whose user/position/target are not in the given prepared data",
    ]


def test_a_shard_whose_every_status_is_unknown_counts_every_row(made, tmp_path):
    """Fails if a batch with no known status at all is miscounted (the number of known statuses is then 0,
    not missing)."""
    _, four, _, _ = made
    store = copy(four, tmp_path / "s")
    _rewrite(store, SHARDS[3], lambda t: _set(t, "status", pa.array(["weird"], pa.string())))
    assert verify_store(store) == [f"{SHARDS[3]}: 1 row(s) with a status other than {', '.join(STATUSES)}"]


def test_a_sealed_shard_with_a_flipped_page_or_a_torn_footer_is_unreadable_saying_why(made, tmp_path):
    """Damage whose sha256 was recorded again (so only reading the shard can tell): a flipped byte in an h_dec
    page and a torn footer. Fails if the pages' CRC checksums are not verified, or the problem does not name
    the exception and its message."""
    _, four, _, _ = made
    store = copy(four, tmp_path / "s")
    data = bytearray((store / SHARDS[1]).read_bytes())
    data[column_offset(store / SHARDS[1], "h_dec")] ^= 0xFF
    (store / SHARDS[1]).write_bytes(bytes(data))
    (store / SHARDS[2]).write_bytes((store / SHARDS[2]).read_bytes()[:200])
    for name in SHARDS[1:3]:
        _seal(store, name)
    assert verify_store(store) == [
        f"{SHARDS[1]}: unreadable (OSError: could not verify page integrity, CRC checksum verification failed "
        "for page_ordinal 0)",
        f"{SHARDS[2]}: unreadable (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.)"]


def test_a_float32_store_is_sound(tmp_path):
    """Fails if the verifier checks every store against the float16 schema (the default h_dec dtype)."""
    inputs = load_inputs(*make_inputs(tmp_path / "in"))
    run_dump(DumpConfig(shard_rows=4, h_dec_dtype="float32"), inputs, FakeBackend(), FAKE_TEACHER, tmp_path / "s")
    assert verify_store(tmp_path / "s") == []


def test_merge_refuses_two_sources_whose_copies_of_a_shard_differ_and_keeps_float32(made, tmp_path):
    """Two runs with the same settings can still write a shard with other bytes (vLLM's batch-dependent float
    noise, another machine's kernels). Fails if `cache merge` keeps either copy instead of refusing, naming the
    shard and both sources, or if a merge of float32 stores is labelled (and so checked) float16."""
    from pipeline.store.merge import merge_stores

    prepared, _, _, _ = made
    inputs = load_inputs(prepared, prepared.parent / "candidates" / "candidates.parquet")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_dump(DumpConfig(shard_rows=4, h_dec_dtype="float32"), inputs, FakeBackend(), FAKE_TEACHER, out)
    merged = merge_stores(tmp_path / "ab", [a, b])
    assert merged["h_dec_dtype"] == "float32" and verify_store(tmp_path / "ab") == []
    name = "part-00001-of-00003.parquet"
    rewrite_with_other_scores(b / name)
    _seal(b, name)
    assert verify_store(b) == []
    with pytest.raises(UsageError) as e:
        merge_stores(tmp_path / "ba", [a, b])
    assert str(e.value) == f"{name} differs between {a} and {b}: the partial runs disagree"
