"""The store writer's decisions on a directory a crash, a hand or another run left behind, checked in-process
(docs/MUTATION.md: the writer's mutation score was 63% because these paths were reached only through crash
campaigns): which shards a rerun keeps, which the manifest lists, what it logs and refuses, and the bytes
of the manifest itself. Fake teacher; 10 samples in shards of 3, 3, 3, 1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.store as store_mod
from pipeline.errors import UsageError
from pipeline.store import MANIFEST, META_KEY, StoreSpec, StoreWriter, sha256_file, store_schema
from pipeline.store.check import verify_store
from pipeline.store.format import decodes
from pipeline.store.lock import release
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs
from tests.test_store_corruption import _set, column_offset

SHARDS = [f"part-0000{i}-of-00004.parquet" for i in range(4)]
LOG = "pipeline.store"


@pytest.fixture
def made(tmp_path: Path):
    """(inputs, a complete store of 4 shards)."""
    inputs = load_inputs(*make_inputs(tmp_path / "in"))
    out = tmp_path / "store"
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, out)
    return inputs, out


def spec_of(out: Path) -> StoreSpec:
    m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return StoreSpec(m["settings"], m["n_samples"], m["shard_rows"], m["hidden_size"], m["h_dec_dtype"])


def listed(out: Path) -> list[str]:
    return [s["name"] for s in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["shards"]]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]


def rewrite_with_other_scores(path: Path) -> None:
    """The same shard (metadata, rows, layout) with other scores: sound, decodable, but not what was listed."""
    table = pq.read_table(path)
    scores = pa.array([[v + 1.0 for v in row] for row in table.column("scores").to_pylist()], pa.list_(pa.float32()))
    pq.write_table(_set(table, "scores", scores), path, compression="zstd")


def flip_h_dec_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[column_offset(path, "h_dec")] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ refusals: what differs, named once


def test_a_changed_layout_is_named_once_with_what_to_do(made):
    """Fails if the refusal names a difference twice (teacher-dump's settings hold the layout, and the
    layout was listed again), drops what to do, or names another directory."""
    inputs, out = made
    with pytest.raises(UsageError) as e:
        run_dump(DumpConfig(shard_rows=4), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert str(e.value) == (f"{out} holds a teacher store made with other settings; refusing to mix them. "
                            "Differences: shard_rows: stored 3, now 4. Use another --out directory, delete this "
                            "one, or pass --replace-mismatched.")


def test_layout_differences_outside_the_settings_are_listed_after_them(tmp_path: Path):
    """A library caller's settings need not hold the layout: then the manifest's n_samples and shard_rows are
    compared too, each named with both values. Fails if they are left out, joined otherwise, or if a
    layout value that did not change is named."""
    out = tmp_path / "s"
    StoreWriter(out, StoreSpec({"k": 8, "a": 1}, n_samples=10, shard_rows=3, hidden_size=4))
    with pytest.raises(UsageError, match="Differences: a: stored 1, now 2; n_samples: stored 10, now 12; "
                                         r"shard_rows: stored 3, now 4\. Use another"):
        StoreWriter(out, StoreSpec({"k": 8, "a": 2}, n_samples=12, shard_rows=4, hidden_size=4))
    with pytest.raises(UsageError, match=r"Differences: a: stored 1, now 2\. Use another"):
        StoreWriter(out, StoreSpec({"k": 8, "a": 2}, n_samples=10, shard_rows=3, hidden_size=4))


def test_a_hand_edited_fingerprint_or_a_manifest_without_settings_is_refused_not_crashed(made):
    """Fails if a manifest whose fingerprint alone was edited is accepted or refused without a difference to
    name, or if one without settings crashes the writer instead of being refused."""
    _, out = made
    spec = spec_of(out)
    m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    (out / MANIFEST).write_text(json.dumps({**m, "fingerprint": "0" * 64}), encoding="utf-8")
    with pytest.raises(UsageError, match=r"Differences: \(fingerprint only\)\. Use another"):
        StoreWriter(out, spec)
    (out / MANIFEST).write_text(json.dumps({"schema_version": 1, "fingerprint": "0" * 64}), encoding="utf-8")
    with pytest.raises(UsageError, match=r"Differences: .*k: stored None, now 8.*Use another"):
        StoreWriter(out, spec)


def test_shards_without_a_manifest_still_identify_their_store(made):
    """A crash before the first manifest write leaves shards only; the first shard whose footer reads tells
    the settings. Fails if such a directory is taken over by a run with other settings (the old shards
    of another layout stay beside the new ones), if a torn first shard stops the search, or if the writer
    replaces a mismatched store without being asked (its default)."""
    inputs, out = made
    (out / MANIFEST).unlink()
    (out / SHARDS[0]).write_bytes((out / SHARDS[0]).read_bytes()[:100])  # torn: skipped, the next one tells
    other = DumpConfig(shard_rows=4)
    with pytest.raises(UsageError, match=rf"^{out} holds a teacher store made with other settings; .*"
                                         "shard_rows: stored 3, now 4"):
        run_dump(other, inputs, FakeBackend(), FAKE_TEACHER, out)
    with pytest.raises(UsageError, match="made with other settings"):  # the writer's default: refuse
        StoreWriter(out, StoreSpec({"k": 8}, 10, 3, FakeBackend().hidden_size))
    assert sorted(p.name for p in out.glob("part-*")) == SHARDS  # nothing deleted, nothing added


def test_replacing_keeps_a_readme_a_person_wrote_and_logs_exactly_what_it_replaces(made, caplog):
    """--replace-mismatched deletes only what the store owns. Fails if a README.md that gedistill did not
    write counts as the store's card (and is deleted), or if the warning stops naming the directory and
    the differences."""
    inputs, out = made
    (out / "README.md").write_text("# my notes\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"also other files \(README\.md\); not deleting it"):
        run_dump(DumpConfig(shard_rows=4, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert (out / "README.md").read_text(encoding="utf-8") == "# my notes\n"
    (out / "README.md").unlink()
    with caplog.at_level(logging.WARNING, logger=LOG):
        run_dump(DumpConfig(shard_rows=4, replace_mismatched=True), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert warnings_of(caplog) == [f"{out}: replacing a teacher store made with other settings "
                                   "(shard_rows: stored 3, now 4)"]
    assert verify_store(out) == [] and len(list(out.glob("part-*"))) == 3


def test_a_nested_out_directory_is_created(made, tmp_path: Path):
    """Fails if --out must already have its parents."""
    inputs, _ = made
    out = tmp_path / "a" / "b" / "store"
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert verify_store(out) == []


# ------------------------------------------------------------------ what a rerun keeps (shard_ok)


def test_a_rerun_keeps_sound_shards_and_recomputes_each_bad_one_saying_why(made, caplog):
    """One kind of damage per shard: torn footer, another shard's bytes (wrong rows), rescored since listed,
    and (with no manifest) a flipped data page. Fails if any bad shard is kept, a sound one is recomputed,
    or the warning does not name the shard and the reason."""
    inputs, out = made
    w = StoreWriter(out, spec_of(out))
    assert [w.shard_ok(i) for i in range(4)] == [True] * 4
    (out / SHARDS[0]).write_bytes((out / SHARDS[0]).read_bytes()[:100])
    shutil.copyfile(out / SHARDS[3], out / SHARDS[1])  # a sound shard, in the wrong place
    rewrite_with_other_scores(out / SHARDS[2])
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert [w.shard_ok(i) for i in range(4)] == [False, False, False, True]
    got = warnings_of(caplog)
    assert got[0].startswith(f"shard {SHARDS[0]} is unreadable (Parquet magic bytes not found") and \
        got[0].endswith("); it will be recomputed")
    assert got[1:] == [f"shard {SHARDS[1]} does not match this run; it will be recomputed",
                       f"shard {SHARDS[2]} fails its checksum; it will be recomputed"]
    report = run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert report.shards_written == 3 and verify_store(out) == []


def test_without_a_manifest_a_decoding_shard_is_kept_and_a_damaged_one_recomputed(made, caplog):
    """A crash before the manifest write: the shards are unlisted, so each must decode whole. Fails if a shard
    with a flipped data page is kept, if sound ones are recomputed, or if the warning changes."""
    inputs, out = made
    spec = spec_of(out)
    flip_h_dec_page(out / SHARDS[2])
    (out / MANIFEST).unlink()
    w = StoreWriter(out, spec)
    (out / MANIFEST).unlink()  # the constructor wrote one; read it as missing, as after the crash
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert [w.shard_ok(i) for i in range(4)] == [True, True, False, True]
    assert f"shard {SHARDS[2]} is not in the manifest and does not decode; it will be recomputed" in warnings_of(caplog)
    report = run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, out)
    assert report.shards_written == 1 and verify_store(out) == []


def test_a_listed_shard_whose_sha256_matches_is_not_decoded_again(made, monkeypatch):
    """Fails if a resumed run decodes every listed shard (seconds per GB) although its sha256 already
    matches the manifest."""
    _, out = made
    w = StoreWriter(out, spec_of(out))
    calls = []
    monkeypatch.setattr(store_mod, "decodes", lambda p: calls.append(p) or decodes(p))
    assert all(w.shard_ok(i) for i in range(4)) and calls == []


# ------------------------------------------------------------------ what the manifest lists (_entry)


def test_a_shard_changed_since_listed_is_never_laundered_into_the_manifest(made, caplog):
    """Fails if the manifest writer rehashes a shard that differs from its listed sha256 and lists the new
    hash (a corrupted or replaced shard would then pass `cache verify`)."""
    _, out = made
    rewrite_with_other_scores(out / SHARDS[1])
    w = StoreWriter(out, spec_of(out))
    with caplog.at_level(logging.WARNING, logger=LOG):
        m = w.write_manifest()
    assert [s["name"] for s in m["shards"]] == [SHARDS[0], SHARDS[2], SHARDS[3]] and m["complete"] is False
    assert warnings_of(caplog) == [f"{SHARDS[1]} differs from its sha256 in the manifest; left out until it is "
                                   "recomputed"]


def test_unlisted_shards_are_listed_only_when_sound(made, caplog):
    """With no manifest, the writer lists what is in the directory. Fails if it lists a shard that does not
    decode, one with the wrong number of rows, or a torn one (which must be named in a warning)."""
    _, out = made
    spec = spec_of(out)
    (out / MANIFEST).unlink()
    flip_h_dec_page(out / SHARDS[2])
    shutil.copyfile(out / SHARDS[3], out / SHARDS[0])  # right fingerprint, 1 row where 3 belong
    (out / SHARDS[1]).write_bytes((out / SHARDS[1]).read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger=LOG):
        StoreWriter(out, spec)  # writes the missing manifest
    assert listed(out) == [SHARDS[3]]
    torn = [m for m in warnings_of(caplog) if m.startswith(f"{SHARDS[1]} is unreadable (Parquet magic bytes not found")]
    assert len(torn) == 1 and torn[0].endswith("); left out of the manifest")


def test_manifest_entries_and_bytes_are_the_documented_format(tmp_path: Path):
    """The manifest is a DVC output shared between machines: its bytes must not depend on anything but the
    store. Fails if an entry loses its index or size or changes a value, if the JSON is written with
    another indentation or with non-ASCII text escaped, or if the run facts of an earlier write are lost."""
    inputs = load_inputs(*make_inputs(tmp_path / "in"))
    out = tmp_path / "store"
    run_dump(DumpConfig(shard_rows=3), inputs, FakeBackend(), FAKE_TEACHER, out)
    w = StoreWriter(out, spec_of(out))
    w.write_manifest({"note": "é"})
    m = w.write_manifest()
    assert m["run"]["note"] == "é"
    raw = (out / MANIFEST).read_text(encoding="utf-8")
    assert raw == json.dumps(m, indent=1, ensure_ascii=False) and '"note": "é"' in raw
    assert m["shards"] == [{"name": n, "index": i, "rows": 1 if i == 3 else 3, "sha256": sha256_file(out / n),
                            "size": (out / n).stat().st_size} for i, n in enumerate(SHARDS)]


def test_the_manifest_writer_hashes_each_shard_once_per_process(made, monkeypatch):
    """Fails if a shard this process wrote or already hashed is hashed again at every manifest write
    (about 1 s per GB, after every shard of a long dump)."""
    _, out = made
    w = StoreWriter(out, spec_of(out))
    w.write_manifest()  # hashes the shards of the earlier run once
    table = pq.read_table(out / SHARDS[1])
    calls = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    w.write_shard(1, table)
    w.write_manifest()
    w.write_manifest()
    assert [c for c in calls if not c.startswith(".")] == []  # only the temporary file, while writing it
    assert verify_store(out) == []


# ------------------------------------------------------------------ workers, shard files


def test_pending_takes_this_workers_share_and_refuses_an_index_outside_it(made):
    """Fails if the default is not one worker, if the last valid index is refused or one past it accepted,
    or if the message does not give the valid range."""
    _, out = made
    (out / SHARDS[1]).unlink()
    w = StoreWriter(out, spec_of(out))
    assert w.pending() == [1]
    assert w.pending(2, 1) == [1] and w.pending(2, 0) == []
    with pytest.raises(UsageError) as e:
        w.pending(2, 2)
    assert str(e.value) == "--worker-index must be in 0..1, got 2"


def synthetic_table(n: int, k: int = 2, hidden: int = 2, dtype: str = "float16") -> pa.Table:
    schema = store_schema(hidden, dtype)
    cols = {"sample_id": np.arange(n), "user_idx": np.zeros(n, np.int32), "position": np.zeros(n, np.int32),
            "target": np.ones(n, np.int32), "candidates": [[1, 2]] * n, "ranking": [[0, 1]] * n,
            "scores": [[0.5, 0.25]] * n, "h_dec": [[0.5] * hidden] * n, "status": ["ok"] * n,
            "prompt_tokens": np.full(n, 7, np.int32), "truncated": np.zeros(n, bool), "prompt": ["p"] * n,
            "generated": [""] * n}
    return pa.table({name: pa.array(cols[name], schema.field(name).type) for name in schema.names})


def test_shards_are_written_in_row_groups_of_1024_with_the_stores_h_dec_type(tmp_path: Path):
    """Stage two streams a shard one row group at a time. Fails if a shard is written as one row group (or
    groups of another size), if h_dec is cast to float16 in a float32 store, or if a wrong row count is
    refused without saying which shard needs how many rows."""
    w = StoreWriter(tmp_path / "s", StoreSpec({"k": 2}, n_samples=2100, shard_rows=2100, hidden_size=2,
                                              h_dec_dtype="float32"))
    path = w.write_shard(0, synthetic_table(2100, dtype="float32"))
    md = pq.read_metadata(path)
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [1024, 1024, 52]
    h_type = pq.read_schema(path).field("h_dec").type
    assert (h_type.value_type, h_type.list_size) == (pa.float32(), 2)
    assert META_KEY in pq.read_schema(path).metadata
    with pytest.raises(ValueError) as e:
        w.write_shard(0, synthetic_table(2099, dtype="float32"))
    assert str(e.value) == "shard 0 needs 2100 rows, got 2099"
    w = StoreWriter(tmp_path / "t", StoreSpec({"k": 2}, n_samples=5, shard_rows=3, hidden_size=2))
    with pytest.raises(ValueError) as e:
        w.write_shard(1, synthetic_table(3))
    assert str(e.value) == "shard 1 needs 2 rows, got 3"


def test_a_shard_held_by_another_process_is_refused_naming_it_and_its_pid(made):
    """Two runs on one directory: the second is refused before it writes. Fails if the refusal does not name
    the shard and the pid holding it (a forked process that claimed shard 2 and waits)."""
    _, out = made
    spec = spec_of(out)
    release(out)  # this process's locks from the dump above: the child is to hold shard 2, not us
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            StoreWriter(out, spec).claim([2])
            os.write(go, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        with pytest.raises(UsageError) as e:
            StoreWriter(out, spec).claim([1, 2])
        assert str(e.value).startswith(f"{out}: {SHARDS[2]} is being written by pid {pid}, another teacher-dump")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
