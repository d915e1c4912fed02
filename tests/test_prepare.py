from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.errors import UsageError
from pipeline.data.prepare import PrepareConfig, build_sequences
from pipeline.data.prepared import load_prepared, write_prepared
from pipeline.data.sources import Columns, read_interactions, read_items


def frame(rows):
    df = pl.DataFrame(rows, schema=["user", "item", "ts"], orient="row")
    return df.with_columns(pl.col("ts").cast(pl.Float64)).with_row_index("row")


def test_leave_one_out_and_ids():
    inter = frame([("b", "30", 5), ("a", "10", 3), ("a", "20", 1), ("a", "30", 2), ("b", "10", 1),
                   ("b", "20", 9), ("a", "5", 4)])
    seqs, items, _ = build_sequences(inter, None, PrepareConfig())
    # ids: items in numeric order of the original ids: 5->1, 10->2, 20->3, 30->4; users a->0, b->1
    assert items["item_id"].to_list() == ["5", "10", "20", "30"]
    assert items["item_idx"].to_list() == [1, 2, 3, 4]
    a, b = seqs.row(0, named=True), seqs.row(1, named=True)
    assert a["user_id"] == "a" and a["train"] == [3, 4] and a["valid"] == 2 and a["test"] == 1
    assert b["user_id"] == "b" and b["train"] == [2] and b["valid"] == 4 and b["test"] == 3


def test_equal_timestamps_keep_file_order():
    inter = frame([("a", "1", 1), ("a", "2", 1), ("a", "3", 7), ("a", "4", 7), ("a", "5", 7)])
    seqs, _, _ = build_sequences(inter, None, PrepareConfig())
    row = seqs.row(0, named=True)
    assert row["train"] == [1, 2, 3] and row["valid"] == 4 and row["test"] == 5


def test_duplicates_refused_or_dropped():
    inter = frame([("a", "1", 1), ("a", "1", 1), ("a", "2", 2), ("a", "3", 3)])
    with pytest.raises(UsageError, match="1 duplicate rows.*--drop-duplicates"):
        build_sequences(inter, None, PrepareConfig())
    seqs, _, report = build_sequences(inter, None, PrepareConfig(drop_duplicates=True))
    assert seqs.row(0, named=True)["train"] == [1]
    assert report.filtered == [{"step": "duplicates", "removed": 1}]


def test_short_users_dropped_with_warning_and_empty_result_refused():
    inter = frame([("a", "1", 1), ("a", "2", 2), ("a", "3", 3), ("b", "1", 1), ("b", "2", 2)])
    seqs, _, report = build_sequences(inter, None, PrepareConfig())
    assert seqs["user_id"].to_list() == ["a"]
    assert "1 users have fewer than 3" in report.warnings[0]
    with pytest.raises(UsageError, match="no users left"):
        build_sequences(frame([("b", "1", 1), ("b", "2", 2)]), None, PrepareConfig())


def test_kcore_filters_iteratively():
    rows = [(u, str(i), t) for u in "abc" for t, i in enumerate([1, 2, 3, 4])] + [("d", "9", 1), ("d", "1", 2), ("d", "2", 3)]
    seqs, items, report = build_sequences(frame(rows), None, PrepareConfig(kcore=3))
    assert set(seqs["user_id"]) == {"a", "b", "c"}  # d's item 9 has one user; then d has 2 < 3
    assert "9" not in items["item_id"].to_list()
    assert report.filtered[0]["removed"] == 3


def test_item_text_unknown_rows_warn_and_none_matching_refused():
    inter = frame([("a", "1", 1), ("a", "2", 2), ("a", "3", 3)])
    text = pl.DataFrame({"item": ["1", "2", "99"], "title": ["One", "Two", "Ninety-nine"], "text": ["", "", ""]})
    _, items, report = build_sequences(inter, text, PrepareConfig())
    assert items["title"].to_list() == ["One", "Two", "item 3"]
    assert any("1 item-text rows" in w for w in report.warnings)
    assert any("1 items have no text" in w for w in report.warnings)
    bad = pl.DataFrame({"item": ["x", "y"], "title": ["X", "Y"], "text": ["", ""]})
    with pytest.raises(UsageError, match="none of the 2 item-text ids match"):
        build_sequences(inter, bad, PrepareConfig())


def test_bad_files_name_file_and_column(tmp_path: Path):
    p = tmp_path / "i.csv"
    pl.DataFrame({"uid": ["a"], "item_id": ["1"], "timestamp": ["1"]}).write_csv(p)
    with pytest.raises(UsageError, match=r"i\.csv: missing user column 'user_id'.*--user-col"):
        read_interactions(p, Columns())
    pl.DataFrame({"user_id": ["a", "a"], "item_id": ["1", "2"], "timestamp": ["1", "yesterday"]}).write_csv(p)
    with pytest.raises(UsageError, match=r"column 'timestamp' has 1 non-numeric or non-finite timestamps \(first at row 2: 'yesterday'\)"):
        read_interactions(p, Columns())
    # "nan" and "inf" parse as floats (NaN, inf), not as nulls: a time that orders nothing, refused the same way
    pl.DataFrame({"user_id": ["a"] * 4, "item_id": ["1", "2", "3", "4"], "timestamp": ["1", "nan", "2", "-inf"]}
                 ).write_csv(p)
    with pytest.raises(UsageError, match=r"has 2 non-numeric or non-finite timestamps \(first at row 2: 'nan'\)"):
        read_interactions(p, Columns())
    pq = tmp_path / "i.parquet"
    pl.DataFrame({"user_id": ["a", "a"], "item_id": ["1", "2"], "timestamp": [1.0, float("inf")]}).write_parquet(pq)
    with pytest.raises(UsageError, match=r"has 1 non-numeric or non-finite timestamps \(first at row 2: inf\)"):
        read_interactions(pq, Columns())
    from datetime import datetime

    pl.DataFrame({"user_id": ["a", "a"], "item_id": ["1", "2"], "timestamp": [datetime(2020, 1, 1), None]}
                 ).write_parquet(pq)  # a null in a datetime column orders nothing either
    with pytest.raises(UsageError, match=r"has 1 non-numeric or non-finite timestamps \(first at row 2: None\)"):
        read_interactions(pq, Columns())
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(UsageError, match="junk.parquet: cannot be read as parquet"):
        read_interactions(junk, Columns())
    with pytest.raises(UsageError, match="unsupported file type"):
        read_interactions(tmp_path / "x.json", Columns()) if (tmp_path / "x.json").write_text("{}") else None
    items = tmp_path / "items.csv"
    pl.DataFrame({"item_id": ["1", "1"], "title": ["A", "B"]}).write_csv(items)
    with pytest.raises(UsageError, match="item id '1' appears 2 times"):
        read_items(items, Columns())


def test_datetime_timestamps_and_prepared_round_trip(tmp_path: Path):
    from datetime import datetime

    df = pl.DataFrame({"user_id": ["a"] * 3, "item_id": ["1", "2", "3"],
                       "timestamp": [datetime(2020, 1, d) for d in (3, 1, 2)]})
    p = tmp_path / "i.parquet"
    df.write_parquet(p)
    inter = read_interactions(p, Columns())
    seqs, items, _ = build_sequences(inter, None, PrepareConfig())
    assert seqs.row(0, named=True)["train"] == [2] and seqs.row(0, named=True)["test"] == 1
    summary = write_prepared(tmp_path / "prep", seqs, items, {})
    data = load_prepared(tmp_path / "prep")
    assert data.fingerprint == summary["fingerprint"] and data.n_items == 3
    np.testing.assert_array_equal(data.train[0], [2])
    # a tampered store is detected
    seqs2 = seqs.with_columns(pl.lit(3).cast(pl.Int32).alias("test"))
    seqs2.write_parquet(tmp_path / "prep" / "sequences.parquet")
    with pytest.raises(UsageError, match="does not match summary.json"):
        load_prepared(tmp_path / "prep")


def test_recbole_time_order_merges_near_timestamps_into_file_order_ties():
    # span 1e9 s: float32 of ts/1e9 cannot tell 500_000_000 from 500_000_001, so file order decides
    inter = frame([("a", "1", 0), ("a", "2", 500_000_001), ("a", "3", 500_000_000), ("a", "4", 1_000_000_000)])
    exact, _, _ = build_sequences(inter, None, PrepareConfig())
    assert exact.row(0, named=True)["train"] == [1, 3]
    rb, _, _ = build_sequences(inter, None, PrepareConfig(time_order="recbole"))
    assert rb.row(0, named=True)["train"] == [1, 2]


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_summary_is_the_same_wherever_the_input_lives(tmp_path: Path):
    """Fails if summary.json (a DVC output) records the absolute path of the input file (or any other
    absolute path): two checkouts of one dataset then write different bytes, DVC hashes them differently
    and a shared cache cannot deduplicate. Both runs go through the installed `gedistill prepare`."""
    import json

    from tests.conftest import synthetic_interactions
    from tests.test_entrypoint import run_gedistill

    summaries = []
    for clone in ("a", "b"):
        inter = tmp_path / clone / "in" / "inter.csv"
        inter.parent.mkdir(parents=True)
        synthetic_interactions(n_users=8, n_items=12, length=6).write_csv(inter)
        r = run_gedistill("prepare", "--interactions", str(inter), "--out", "prep", cwd=tmp_path / clone)
        assert r.returncode == 0, r.stderr
        summaries.append((tmp_path / clone / "prep" / "summary.json").read_bytes())
    assert summaries[0] == summaries[1]
    summary = json.loads(summaries[0])
    assert not [s for s in _strings(summary) if str(tmp_path) in s or s.startswith("/")]
    ident = summary["interactions_file"]  # what names the source instead: file name and content hash
    assert ident["name"] == "inter.csv" and len(ident["sha256"]) == 64


def test_embedded_source_is_named_by_package_and_version(tmp_path: Path):
    """Fails if the embedded dataset is recorded by its path in this machine's site-packages instead of
    recbole==version and the path inside the package."""
    import json

    from tests.test_entrypoint import run_gedistill

    r = run_gedistill("prepare", "--out", str(tmp_path / "prep"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "prep" / "summary.json").read_text())
    assert not [s for s in _strings(summary) if s.startswith("/") or "site-packages" in s]
    assert summary["interactions_file"]["package"] == "recbole==1.2.1"
    assert summary["interactions_file"]["name"] == "recbole/dataset_example/ml-100k/ml-100k.inter"


def test_only_file_entries_become_identities(tmp_path: Path, monkeypatch):
    """Fails if write_prepared turns a non-file entry into a file identity because its text names a file
    (a dataset called like a file in the working directory), or leaves an absolute `*_file` path in."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n")
    seqs, items, _ = build_sequences(frame([("a", "1", 1), ("a", "2", 2), ("a", "3", 3)]), None, PrepareConfig())
    summary = write_prepared(tmp_path / "prep", seqs, items,
                             {"dataset": "inter.csv", "interactions_file": str(tmp_path / "inter.csv")})
    assert summary["dataset"] == "inter.csv"
    assert summary["interactions_file"]["name"] == "inter.csv" and "package" not in summary["interactions_file"]
    assert str(tmp_path) not in (tmp_path / "prep" / "summary.json").read_text()
    assert json.loads((tmp_path / "prep" / "summary.json").read_text())["interactions_file"] == summary["interactions_file"]
