"""The teacher store's dataset card (README.md, pipeline/store/card.py): `datasets.load_dataset(store_dir)` reads
exactly the shards, `h_dec` as a fixed-length float list; the card is deterministic; `cache verify` checks its
header against the manifest; the writer never deletes a README it did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UsageError
from pipeline.store import StoreSpec, StoreWriter, open_store
from pipeline.store.card import CARD, MARKER, check_card, front_matter
from pipeline.store.merge import merge_stores
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

GEDISTILL = str(Path(sys.executable).parent / "gedistill")


def _store(tmp_path: Path, name: str = "s", shard_rows: int = 3, **cfg) -> Path:
    """A complete store written by teacher-dump's own code (fake backend: 10 samples, K=8, h_dec 16 wide)."""
    out = tmp_path / name
    run_dump(DumpConfig(shard_rows=shard_rows, **cfg), _inputs(tmp_path), FakeBackend(), FAKE_TEACHER, out)
    return out


def _inputs(tmp_path: Path):
    inputs = tmp_path / "in"
    if not inputs.exists():
        make_inputs(inputs)
    return load_inputs(inputs / "prepared", inputs / "candidates" / "candidates.parquet")


def _gedistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GEDISTILL, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GEDISTILL_NO_PROGRESS": "1"})


@pytest.mark.parametrize("h_dtype", ["float16", "float32"])
def test_load_dataset_reads_the_shards_through_the_card(tmp_path: Path, h_dtype: str):
    """Fails if the store has no card, if its `data_files` are not exactly the manifest's shards (a Parquet file
    someone left in the directory is read too: 20 rows instead of 10 with `path: "*.parquet"`, which is what
    `datasets` infers without a card), or if the features disagree with the Parquet schema (a wrong `h_dec`
    length or dtype fails the cast). Rows and h_dec are compared with the Parquet's, value for value."""
    import datasets

    for shard_rows in (3, 64):  # 4 shards, and 1 shard
        store = _store(tmp_path, f"s{shard_rows}-{h_dtype}", shard_rows=shard_rows, h_dec_dtype=h_dtype)
        assert (store / CARD).is_file()
        shutil.copyfile(next(store.glob("part-*.parquet")), store / "copy-of-a-shard.parquet")  # not the store's
        ds = datasets.load_dataset(str(store), split="train", cache_dir=str(tmp_path / f"hf-{shard_rows}-{h_dtype}"))
        table = pq.ParquetDataset(sorted(str(p) for p in store.glob("part-*.parquet"))).read()
        assert ds.num_rows == table.num_rows == 10
        assert ds.column_names == table.column_names
        feature = ds.features["h_dec"]
        assert isinstance(feature, datasets.List) and feature.length == 16 and feature.feature.dtype == h_dtype
        arrow = ds.data.table.column("h_dec").combine_chunks()  # what datasets holds, before any formatter
        assert str(arrow.type) == f"fixed_size_list<item: {'halffloat' if h_dtype == 'float16' else 'float'}>[16]"
        ours = arrow.flatten().to_numpy(zero_copy_only=False).reshape(10, 16)
        assert ours.dtype == np.dtype(h_dtype)
        want = table.column("h_dec").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(10, 16)
        np.testing.assert_array_equal(ours, want)
        assert ds["sample_id"] == table.column("sample_id").to_pylist()
        assert ds["ranking"] == table.column("ranking").to_pylist()


def test_card_describes_the_store_and_is_deterministic(tmp_path: Path):
    """Fails if the card carries a date or host fact (two writers of the same store must write the same bytes:
    DVC hashes the store directory), if a rerun rewrites it, or if it omits what a reader needs: columns, teacher,
    template, fingerprint, and how to read it with datasets, polars and pyarrow."""
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    text = (a / CARD).read_text()
    assert text == (b / CARD).read_text()
    manifest = json.loads((a / "manifest.json").read_text())
    assert text.startswith(f"---\n{MARKER}\n") and manifest["fingerprint"] in text
    for needle in ("`h_dec`", "`candidates`", "`ranking`", "`status`", "fake", "test", manifest["settings"]["template"],
                   "datasets.load_dataset(", "pl.scan_parquet(", "pyarrow.dataset", "gedistill cache verify"):
        assert needle in text, needle
    before = (a / CARD).stat().st_mtime_ns
    StoreWriter(a, StoreSpec(manifest["settings"], manifest["n_samples"], manifest["shard_rows"],
                             manifest["hidden_size"], manifest["h_dec_dtype"])).write_manifest()
    assert (a / CARD).stat().st_mtime_ns == before and (a / CARD).read_text() == text


def test_card_is_written_only_for_a_complete_store_and_by_merge(tmp_path: Path):
    """Fails if a worker's partial store gets a card (it would list shards that are not there), or if the store
    that `cache merge` assembles from the workers has none or another card than a single-process run's."""
    loaded = _inputs(tmp_path)
    w0, w1, whole = tmp_path / "w0", tmp_path / "w1", _store(tmp_path, "whole")
    for i, out in enumerate((w0, w1)):
        run_dump(DumpConfig(shard_rows=3, num_workers=2, worker_index=i), loaded, FakeBackend(), FAKE_TEACHER, out)
        assert not (out / CARD).exists()
    merged = tmp_path / "merged"
    merge_stores(merged, [w0, w1])
    assert (merged / CARD).read_text() == (whole / CARD).read_text()


@pytest.mark.slow  # four installed-command runs: 108 s at load 8-12 on 2 cores (about 3 CPU-seconds each)
def test_verify_checks_the_card_header_against_the_manifest(tmp_path: Path):
    """Decision: `cache verify` compares the card's front matter (what `datasets` readers go by: shards, features,
    fingerprint) with the manifest and fails on a difference; the prose is free to edit; no card is no problem
    (older stores); training (open_store) ignores the card. Fails if a card of another store passes verify, if
    an edited description fails it, or if `cache card` cannot repair a stale card."""
    store, other = _store(tmp_path, "s"), _store(tmp_path, "other", shard_rows=5)
    manifest = json.loads((store / "manifest.json").read_text())
    card = store / CARD
    card.write_text(card.read_text() + "\nNotes by the publisher.\n")  # prose: fine
    r = _gedistill("cache", "verify", str(store))
    assert r.returncode == 0 and "dataset card OK" in " ".join(r.stdout.split()), r.stderr
    card.write_text((other / CARD).read_text())  # another store's card: lists 2 shards instead of 4
    r = _gedistill("cache", "verify", str(store))
    assert r.returncode == 2 and "README.md" in r.stderr and "cache card" in " ".join(r.stderr.split()), r.stderr
    assert open_store(store).n_rows == 10  # stage two reads the manifest and shards only
    r = _gedistill("cache", "card", str(store))
    assert r.returncode == 0, r.stderr
    assert check_card(store, manifest) == [] and card.read_text() == (_store(tmp_path, "same") / CARD).read_text()
    card.unlink()
    assert check_card(store, manifest) == []  # no card: no problem (stores written before cards)
    card.write_text("# my own notes\n")  # a person's README: not a card, and `cache card` keeps it
    assert "not a gedistill dataset card" in check_card(store, manifest)[0]
    r = _gedistill("cache", "card", str(store))
    assert r.returncode == 2 and "move it out of the store" in " ".join(r.stderr.split())
    assert card.read_text() == "# my own notes\n"


def test_replacing_a_store_deletes_its_card_but_never_a_persons_readme(tmp_path: Path):
    """--replace-mismatched deletes a store made with other settings only when the directory holds store files
    alone: the card is one of them (else every DVC rerun after an upstream change would stop here), a README that
    gedistill did not write is not."""
    store = _store(tmp_path, "s")
    m = json.loads((store / "manifest.json").read_text())
    spec = StoreSpec({**m["settings"], "seed": 99}, m["n_samples"], m["shard_rows"], m["hidden_size"], m["h_dec_dtype"])
    StoreWriter(store, spec, replace_mismatched=True)
    assert not (store / CARD).exists() and not list(store.glob("part-*.parquet"))
    mine = _store(tmp_path, "mine")
    (mine / CARD).write_text("# my own notes\n")
    with pytest.raises(UsageError, match=r"also other files \(README.md\)"):
        StoreWriter(mine, spec, replace_mismatched=True)
    assert (mine / CARD).read_text() == "# my own notes\n"


def test_front_matter_quotes_strings_as_yaml_reads_them():
    """Fails if a teacher name or path with YAML-special characters (`: #`, quotes, non-ASCII) breaks the header."""
    import yaml

    name = 'my: "teacher" # v2 é/ü'
    m = {"fingerprint": "f" * 64, "schema_version": 1, "n_samples": 3, "n_shards": 1, "hidden_size": 4,
         "h_dec_dtype": "float16", "tool_version": "0.1.0", "shards": [{"name": "part-00000-of-00001.parquet"}],
         "settings": {"k": 2, "teacher": {"name": name, "revision": None}}}
    head = yaml.safe_load(front_matter(m).strip().strip("-"))
    assert head["gedistill"]["teacher"] == name and head["gedistill"]["teacher_revision"] is None
    assert head["configs"][0]["data_files"][0]["path"] == ["part-00000-of-00001.parquet"]
    assert {"name": "h_dec", "list": "float16", "length": 4} in head["dataset_info"]["features"]
