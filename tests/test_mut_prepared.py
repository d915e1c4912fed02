"""The prepared-data store read and written directly (docs/MUTATION.md: 39% of pipeline/data/prepared.py's mutants
survived test_prepare*, which reach it through `prepare`): what load_prepared returns and refuses, word for word;
the files' types and summary.json's bytes (a DVC output); the content fingerprint pinned, since every teacher
store and checkpoint records it; and how an input file is named without its absolute path."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.data.prepared import (ITEMS, SEQUENCES, SUMMARY, _host_neutral, file_identity, fingerprint,
                                    load_prepared, write_prepared)
from pipeline.errors import UsageError


def tiny() -> tuple[pl.DataFrame, pl.DataFrame]:
    seqs = pl.DataFrame({"user_idx": [0, 1, 2], "user_id": ["u0", "u 1", "u2"],
                         "train": [[1, 2, 3], [2], [3, 1, 2, 4, 1]], "valid": [4, 3, 2], "test": [2, 4, 3]})
    items = pl.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"],
                          "title": ["A", "B", "C", "D"], "text": ["", "x", "", "y\u00e9"]})
    return seqs, items


# sha256 of the tiny set by the fingerprint's definition, written out: a change to it makes every store and
# checkpoint made from prepared data look made from other data (they record this fingerprint)
TINY_FINGERPRINT = "bbafae20871e3ed6c485983b6af077a837b490addd6beeeb820430018878f505"


def expected_fingerprint(seqs: pl.DataFrame, items: pl.DataFrame) -> str:
    h = hashlib.sha256(b"gedistill-prepared-v1")
    lengths = [len(t) for t in seqs["train"].to_list()]
    h.update(np.array(lengths, "<i8").tobytes())
    h.update(np.array([i for t in seqs["train"].to_list() for i in t], "<i8").tobytes())
    h.update(np.array(seqs["valid"].to_list(), "<i8").tobytes())
    h.update(np.array(seqs["test"].to_list(), "<i8").tobytes())
    for col in (seqs["user_id"], items["item_id"], items["title"], items["text"]):
        h.update("\x1f".join(col.to_list()).encode())
    return h.hexdigest()


def test_the_fingerprint_is_the_documented_hash_of_the_content():
    seqs, items = tiny()
    assert fingerprint(seqs, items) == expected_fingerprint(seqs, items) == TINY_FINGERPRINT
    # the same content in other integer widths (as read back from Parquet): the same fingerprint
    narrow = seqs.with_columns(pl.col("train").cast(pl.List(pl.Int32)), pl.col("valid").cast(pl.Int32))
    assert fingerprint(narrow, items) == fingerprint(seqs, items)
    # where one sequence ends and the next begins is content
    moved = seqs.with_columns(pl.Series("train", [[1, 2], [3, 2], [3, 1, 2, 4, 1]]))
    assert fingerprint(moved, items) != fingerprint(seqs, items)
    for frame, col, value in ((seqs, "valid", [4, 3, 1]), (seqs, "test", [2, 4, 1]), (seqs, "user_id", ["u0", "u", "1 u2"]),
                              (items, "title", ["A", "B", "C", "E"]), (items, "text", ["", "x", "", "y"])):
        changed = frame.with_columns(pl.Series(col, value))
        args = (changed, items) if frame is seqs else (seqs, changed)
        assert fingerprint(*args) != fingerprint(seqs, items), col


def test_write_then_load_gives_the_data_back_with_its_types(tmp_path):
    seqs, items = tiny()
    out = tmp_path / "a" / "b"  # made, parents and all
    summary = write_prepared(out, seqs, items, {"source": "tiny", "note": "kept"})
    assert sorted(p.name for p in out.iterdir()) == sorted([SEQUENCES, ITEMS, SUMMARY])  # no temporary file left
    stored = pl.read_parquet(out / SEQUENCES)
    assert dict(stored.schema) == {"user_idx": pl.Int32, "user_id": pl.String, "train": pl.List(pl.Int32),
                                   "valid": pl.Int32, "test": pl.Int32}
    assert pl.read_parquet(out / ITEMS).schema["item_idx"] == pl.Int32
    for name in (SEQUENCES, ITEMS):
        assert pq.ParquetFile(out / name).metadata.row_group(0).column(0).compression == "ZSTD"
    p = load_prepared(out)
    assert p.user_ids == ["u0", "u 1", "u2"] and p.n_users == 3 and p.n_items == 4
    assert [t.tolist() for t in p.train] == [[1, 2, 3], [2], [3, 1, 2, 4, 1]]
    assert all(t.dtype == np.int64 for t in p.train)
    assert p.valid.tolist() == [4, 3, 2] and p.test.tolist() == [2, 4, 3]
    assert p.valid.dtype == p.test.dtype == np.int64
    assert p.items.equals(items.with_columns(pl.col("item_idx").cast(pl.Int32)))
    assert p.fingerprint == summary["fingerprint"] == fingerprint(seqs, items)


def test_summary_json_records_the_split_and_lengths_exactly(tmp_path):
    seqs, items = tiny()
    summary = write_prepared(tmp_path, seqs, items, {"source": "tiny"})
    full = np.array([5, 3, 7])  # train + valid + test per user
    assert summary == {
        "users": 3, "items": 4, "interactions": 15,
        "sequence_length": {"min": 3, "median": 5.0, "mean": 5.0, "p90": float(np.percentile(full, 90)), "max": 7},
        "train_length": {"min": 1, "median": 3.0, "mean": 3.0, "p90": float(np.percentile(full - 2, 90)), "max": 5},
        "split": "leave-one-out: last item test, second-to-last validation, the rest train",
        "order": "timestamp ascending, ties in file order",
        "fingerprint": fingerprint(seqs, items),
        "source": "tiny",
    }
    assert summary["sequence_length"]["p90"] == 6.6
    assert (tmp_path / SUMMARY).read_text() == json.dumps(summary, indent=2) + "\n"


def test_load_refuses_missing_files_naming_each(tmp_path):
    with pytest.raises(UsageError) as e:
        load_prepared(tmp_path)
    assert str(e.value) == (f"{tmp_path}: missing {SEQUENCES}, {ITEMS}, {SUMMARY}; "
                            f"run `gedistill prepare --out {tmp_path}` first")
    write_prepared(tmp_path, *tiny(), {})
    (tmp_path / ITEMS).unlink()
    with pytest.raises(UsageError) as e:
        load_prepared(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: missing {ITEMS}; ")


@pytest.mark.parametrize("name, damage", [(SEQUENCES, b"not parquet"), (SUMMARY, b"{not json")])
def test_load_refuses_unreadable_files(tmp_path, name, damage):
    write_prepared(tmp_path, *tiny(), {})
    (tmp_path / name).write_bytes(damage)
    with pytest.raises(UsageError) as e:
        load_prepared(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: prepared data is unreadable (")
    assert str(e.value).endswith("); rerun `gedistill prepare`")


def test_load_refuses_missing_columns_and_changed_content(tmp_path):
    seqs, items = tiny()
    write_prepared(tmp_path, seqs, items, {})
    pl.read_parquet(tmp_path / SEQUENCES).drop("valid").write_parquet(tmp_path / SEQUENCES)
    with pytest.raises(UsageError) as e:
        load_prepared(tmp_path)
    assert str(e.value) == (f"{tmp_path / SEQUENCES}: expected columns ['test', 'train', 'user_id', 'user_idx', "
                            "'valid']; rerun `gedistill prepare`")
    write_prepared(tmp_path, seqs, items, {})
    items.with_columns(pl.Series("title", ["A", "B", "C", "changed"])).write_parquet(tmp_path / ITEMS)
    with pytest.raises(UsageError) as e:
        load_prepared(tmp_path)
    assert str(e.value) == f"{tmp_path}: content does not match summary.json's fingerprint; rerun `gedistill prepare`"


def _installed_top_level() -> tuple[str, str]:
    """(an importable top-level name, its distribution) of a package this environment has: polars."""
    dist = importlib.metadata.packages_distributions()["polars"][0]
    return "polars", dist


def test_a_file_inside_an_installed_package_is_named_by_package_and_path(tmp_path):
    top, dist = _installed_top_level()
    sha = hashlib.sha256(b"1,2\n").hexdigest()
    for kind in ("site-packages", "dist-packages"):
        for inside in (["x.csv"], ["data", "x.csv"], ["data", "sub", "x.csv"]):  # any depth inside the package
            f = tmp_path / kind / "env" / kind / "outer" / "lib" / kind / top / Path(*inside)  # the innermost wins
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("1,2\n")
            assert file_identity(f) == {"package": f"{dist}=={importlib.metadata.version(dist)}",
                                        "name": "/".join([top, *inside]), "sha256": sha}


def test_other_files_are_named_by_name_and_hash_only(tmp_path):
    sha = hashlib.sha256(b"u,i\n").hexdigest()
    plain = tmp_path / "mine" / "ratings.csv"
    plain.parent.mkdir()
    plain.write_text("u,i\n")
    assert file_identity(plain) == {"name": "ratings.csv", "sha256": sha}
    unknown = tmp_path / "site-packages" / "no_such_package_here" / "r.csv"  # not an installed distribution
    unknown.parent.mkdir(parents=True)
    unknown.write_text("u,i\n")
    assert file_identity(unknown) == {"name": "r.csv", "sha256": sha}
    top = tmp_path / "venv" / "site-packages" / "loose.csv"  # directly in site-packages: no package
    top.parent.mkdir(parents=True)
    top.write_text("u,i\n")
    assert file_identity(top) == {"name": "loose.csv", "sha256": sha}


def test_only_file_settings_that_are_files_are_replaced_by_their_identity(tmp_path):
    f = tmp_path / "inter.csv"
    f.write_text("u,i\n")
    extra = {"interactions_file": str(f), "items_file": str(tmp_path / "absent.csv"), "dataset": str(f),
             "count_file": 3, "path_file": Path(f)}
    got = _host_neutral(extra)
    assert got == {"interactions_file": file_identity(f), "items_file": str(tmp_path / "absent.csv"),
                   "dataset": str(f), "count_file": 3, "path_file": file_identity(f)}
    assert str(tmp_path) not in json.dumps(got["interactions_file"])
