"""Teacher store: round trip, resume, idempotence, fingerprint refusal, verify, worker merge (fake teacher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.errors import UsageError
from pipeline.store import MANIFEST, StoreWriter, iter_batches, open_store
from pipeline.store.check import verify_store
from pipeline.store.merge import merge_stores
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from stages.cache import app as cache_app
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

CFG = DumpConfig(shard_rows=3)  # 10 samples -> shards of 3, 3, 3, 1


@pytest.fixture
def inputs(tmp_path: Path):
    return load_inputs(*make_inputs(tmp_path / "in"))


def dump(inputs, out: Path, cfg: DumpConfig = CFG, backend: FakeBackend | None = None):
    return run_dump(cfg, inputs, backend or FakeBackend(), FAKE_TEACHER, out)


def flat(text: str) -> str:
    """Rich wraps long lines at the terminal width; compare with whitespace collapsed."""
    return " ".join(text.split())


def rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "*.parquet").sort("sample_id")


def test_round_trip_schema_and_reader(inputs, tmp_path):
    out = tmp_path / "store"
    report = dump(inputs, out)
    assert report.complete and report.shards_written == 4 and report.status == {"ok": 10}
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-0000{i}-of-00004.parquet" for i in range(4)]
    info = open_store(out)
    assert (info.n_rows, info.k, info.hidden_size) == (10, 8, 16)
    df = rows(out)
    assert df["sample_id"].to_list() == list(range(10))
    assert df.schema["h_dec"] == pl.Array(pl.Float16, 16)
    # candidates are a permutation of the retriever's set, shown in a seeded per-sample shuffle
    src = inputs.samples["candidates"].to_list()
    shown = df["candidates"].to_list()
    assert all(sorted(a) == sorted(b) for a, b in zip(src, shown)) and any(list(a) != b for a, b in zip(src, shown))
    # first-token ranking = argsort of the stored scores
    for r, s in zip(df["ranking"].to_list(), df["scores"].to_list()):
        assert r == np.argsort(-np.array(s), kind="stable").tolist()
    # streamed reader: same rows, bounded batches, only the asked columns
    batches = list(iter_batches(out, ["sample_id", "h_dec"], batch_rows=2))
    assert max(b.num_rows for b in batches) <= 2 and batches[0].schema.names == ["sample_id", "h_dec"]
    assert [i for b in batches for i in b.column("sample_id").to_pylist()] == list(range(10))
    meta = json.loads(pq.read_metadata(out / "part-00001-of-00004.parquet").metadata[b"gedistill"])
    assert (meta["start"], meta["stop"], meta["fingerprint"]) == (3, 6, info.fingerprint)


def test_retriever_order_keeps_candidates(inputs, tmp_path):
    dump(inputs, tmp_path / "s", DumpConfig(shard_rows=3, candidate_order="retriever"))
    shown = rows(tmp_path / "s")["candidates"].to_list()
    assert shown == [list(c) for c in inputs.samples["candidates"].to_list()]


def test_resume_after_interruption_gives_same_rows(inputs, tmp_path, monkeypatch):
    dump(inputs, tmp_path / "ref")
    written = []
    original = StoreWriter.write_shard

    def crash_after_two(self, index, table):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(index)
        return original(self, index, table)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dump(inputs, tmp_path / "run")
    monkeypatch.setattr(StoreWriter, "write_shard", original)
    assert len(list((tmp_path / "run").glob("*.parquet"))) == 2
    with pytest.raises(UsageError, match=r"incomplete store \(2 of 4 shards\)"):
        open_store(tmp_path / "run")
    stale = tmp_path / "run" / ".part-00002-of-00004.parquet.tmp-99999"  # a half-written shard of a killed run
    stale.write_bytes(b"PAR1 torn")
    report = dump(inputs, tmp_path / "run")
    assert not stale.exists()
    assert (report.shards_written, report.shards_skipped, report.samples) == (2, 2, 4)
    assert rows(tmp_path / "run").equals(rows(tmp_path / "ref"))
    assert verify_store(tmp_path / "run") == []


def test_complete_rerun_is_a_noop(inputs, tmp_path):
    out = tmp_path / "s"
    dump(inputs, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    backend = FakeBackend()
    report = dump(inputs, out, backend=backend)
    assert backend.calls == 0 and report.shards_written == 0 and report.shards_skipped == 4 and report.complete
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_fingerprint_mismatch_is_refused_naming_settings(inputs, tmp_path):
    out = tmp_path / "s"
    dump(inputs, out)
    with pytest.raises(UsageError, match=r"seed: stored 0, now 7.*another --out"):
        dump(inputs, out, DumpConfig(shard_rows=3, seed=7))
    with pytest.raises(UsageError, match="shard_rows: stored 3, now 5"):
        dump(inputs, out, DumpConfig(shard_rows=5))


def test_replace_mismatched_rewrites_the_store_and_keeps_foreign_files(inputs, tmp_path, caplog):
    """What `dvc repro` relies on after an upstream change: the old store is replaced, not mixed."""
    out, fresh = tmp_path / "s", tmp_path / "fresh"
    dump(inputs, out, DumpConfig(shard_rows=5))  # 2 shards, seed 0
    (out / ".part-00000-of-00002.parquet.tmp-99").write_bytes(b"torn")  # left by a killed run
    new = DumpConfig(shard_rows=3, seed=7, replace_mismatched=True)
    with caplog.at_level("WARNING", logger="pipeline.store"):
        report = dump(inputs, out, new)
    assert report.complete and report.shards_written == 4
    assert "replacing a teacher store made with other settings" in caplog.text and "seed: stored 0, now 7" in caplog.text
    dump(inputs, fresh, new)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())  # the torn file went too
    assert rows(out).equals(rows(fresh))
    assert open_store(out).fingerprint == open_store(fresh).fingerprint
    # a directory that also holds something else is never deleted
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"also other files \(notes.txt\)"):
        dump(inputs, out, DumpConfig(shard_rows=3, seed=8, replace_mismatched=True))
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.glob("part-*.parquet"))) == 4


def test_verify_catches_corruption_and_bad_rankings(inputs, tmp_path):
    out = tmp_path / "s"
    dump(inputs, out)
    runner = CliRunner()
    ok = runner.invoke(cache_app, ["verify", str(out)])
    assert ok.exit_code == 0 and "OK (10 rows in 4 shard(s)" in flat(ok.output)
    info = runner.invoke(cache_app, ["info", str(out)])
    assert info.exit_code == 0 and "fake" in flat(info.output) and "ok 10" in flat(info.output)

    shard = out / "part-00002-of-00004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    shard.write_bytes(bytes(data))
    bad = runner.invoke(cache_app, ["verify", str(out)])
    assert bad.exit_code == 2 and "part-00002-of-00004.parquet: sha256 differs" in flat(bad.output)
    # a rerun recomputes the corrupted shard and nothing else
    report = dump(inputs, out)
    assert report.shards_written == 1 and verify_store(out) == []


def test_verify_catches_non_permutation(inputs, tmp_path):
    out = tmp_path / "s"
    dump(inputs, out)
    path = out / "part-00000-of-00004.parquet"
    table = pq.read_table(path)
    ranking = table.column("ranking").to_pylist()
    ranking[1][0] = ranking[1][1]  # a duplicate: no longer a permutation
    table = table.set_column(table.schema.get_field_index("ranking"), "ranking",
                             __import__("pyarrow").array(ranking, table.schema.field("ranking").type))
    pq.write_table(table, path, compression="zstd")
    m = json.loads((out / MANIFEST).read_text())
    m["shards"][0]["sha256"] = __import__("pipeline.store", fromlist=["x"]).sha256_file(path)  # hide the edit
    (out / MANIFEST).write_text(json.dumps(m))
    problems = verify_store(out)
    assert problems == ["part-00000-of-00004.parquet: 1 ranking(s) are not permutations of 0..7"]
    assert CliRunner().invoke(cache_app, ["verify", str(out)]).exit_code == 2


def test_workers_partition_and_merge_equal_one_run(inputs, tmp_path):
    dump(inputs, tmp_path / "one")
    parts = []
    for i in range(3):
        report = dump(inputs, tmp_path / f"w{i}", DumpConfig(shard_rows=3, num_workers=3, worker_index=i))
        assert not report.complete or i == 3
        parts.append(tmp_path / f"w{i}")
    assert sorted(p.name for p in parts[0].glob("*.parquet")) == ["part-00000-of-00004.parquet", "part-00003-of-00004.parquet"]
    with pytest.raises(UsageError, match="in no source"):
        merge_stores(tmp_path / "bad", parts[:2])
    result = CliRunner().invoke(cache_app, ["merge", str(tmp_path / "merged"), *map(str, parts)])
    assert result.exit_code == 0, result.output
    one = json.loads((tmp_path / "one" / MANIFEST).read_text())
    merged = json.loads((tmp_path / "merged" / MANIFEST).read_text())
    assert merged["complete"] and merged["fingerprint"] == one["fingerprint"]
    assert [(s["name"], s["sha256"]) for s in merged["shards"]] == [(s["name"], s["sha256"]) for s in one["shards"]]
    # workers writing into one shared directory complete it in place
    for i in range(3):
        report = dump(inputs, tmp_path / "shared", DumpConfig(shard_rows=3, num_workers=3, worker_index=i))
    assert report.complete and verify_store(tmp_path / "shared") == []


def test_generate_mode_parses_and_counts(inputs, tmp_path):
    report = dump(inputs, tmp_path / "g", DumpConfig(shard_rows=4, mode="generate"))
    assert report.status == {"repaired": 10}
    df = rows(tmp_path / "g")
    assert df["generated"][0] == "[B] > [A] Toy Story > [B] > [Z]"
    assert df["ranking"][0].to_list() == [1, 0, 2, 3, 4, 5, 6, 7]


def test_store_reader_imports_no_llm_stack(tmp_path):
    code = ("import sys, pipeline.store, pipeline.store.check, pipeline.store.merge, pipeline.store.lock, pipeline.store.format,"
            " pipeline.store.read,"
            " pipeline.store.faults, stages.cache, stages.cli;"
            "bad=[m for m in ('transformers','vllm') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
