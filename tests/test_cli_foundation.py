"""CLI smoke tests: exit codes and output of prepare, student-train and retrieve on tiny data."""

import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.candidates import read_candidates
from pipeline.checkpoint import load_student
from pipeline.prepared import load_prepared
from pipeline.train import evaluate
from stages.cli import main


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_pipeline_on_tiny_data(tmp_path: Path, tiny_csv, capsys):
    inter, items = tiny_csv
    prep = tmp_path / "prep"
    assert run(["prepare", "--out", str(prep), "--interactions", str(inter), "--items", str(items),
                "--text-col", "genre"]) == 0
    out = capsys.readouterr().out
    assert "users" in out and "60" in out
    data = load_prepared(prep)
    assert data.n_users == 60 and data.n_items == 40 and len(data.train[0]) == 10
    assert data.items["text"][0] in ("Comedy", "Drama")

    student = tmp_path / "student"
    metrics = tmp_path / "m" / "baseline.json"
    assert run(["student-train", "--prepared", str(prep), "--out", str(student), "--metrics", str(metrics),
                "--hidden", "16", "--max-len", "8", "--epochs", "15", "--patience", "15", "--dropout", "0.1",
                "--batch-size", "16", "--lr", "0.01", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "ndcg@10" in out
    m = json.loads(metrics.read_text())
    assert set(m) >= {"valid", "test", "valid_masked", "test_masked", "best_epoch"}
    assert set(m["test"]) == {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10"}
    # the walk "next item is +1 or +2" is learnable: far above random (HR@10 of random = 10/40)
    assert m["test"]["hr@10"] > 0.6
    # checkpoint round trip reproduces the metrics
    model, meta = load_student(student)
    assert meta["prepared_fingerprint"] == data.fingerprint
    assert evaluate(model, data, "test")["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"])
    ranks = pl.read_parquet(student / "ranks.parquet")
    assert ranks.height == 4 * 60

    cands = tmp_path / "cands.parquet"
    assert run(["retrieve", "--prepared", str(prep), "--student", str(student), "--out", str(cands),
                "--k", "5", "--samples-per-user", "2"]) == 0
    assert "120 samples, K=5" in capsys.readouterr().out
    df, meta = read_candidates(cands)
    assert df.height == 120 and meta["prepared_fingerprint"] == data.fingerprint
    assert df["sample_id"].to_list() == list(range(120))
    for row in df.iter_rows(named=True):
        hist = set(data.train[row["user_idx"]][: row["position"]].tolist())
        assert len(set(row["candidates"])) == 5 and not hist & set(row["candidates"])
        assert row["target"] == data.train[row["user_idx"]][row["position"]]
        assert row["retriever_scores"] == sorted(row["retriever_scores"], reverse=True)


def test_usage_errors_exit_2_with_messages(tmp_path: Path, capsys):
    bad = tmp_path / "bad.csv"
    pl.DataFrame({"uid": ["a"], "item_id": ["1"], "timestamp": [1]}).write_csv(bad)
    assert run(["prepare", "--out", str(tmp_path / "p"), "--interactions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing user column 'user_id'" in err and "--user-col" in err
    assert run(["student-train", "--prepared", str(tmp_path / "nothing")]) == 2
    assert "run `gedistill prepare" in capsys.readouterr().err
    assert run(["student-train", "--loss", "hinge"]) == 2
    assert "--loss must be ce or bce" in capsys.readouterr().err
    assert run(["retrieve", "--student", str(tmp_path / "none"), "--prepared", str(tmp_path / "none")]) == 2
    assert run(["no-such-command"]) == 2


def test_sample_selection_last_positions_and_skip():
    import numpy as np

    from pipeline.candidates import select_samples

    train = [np.arange(1, 7), np.arange(1, 3)]  # lengths 6 and 2
    u, p = select_samples(train, 2)
    assert list(zip(u.tolist(), p.tolist())) == [(0, 4), (0, 5), (1, 1)]
    u, p = select_samples(train, 1, skip_last=1)
    assert list(zip(u.tolist(), p.tolist())) == [(0, 4)]  # user 1 has no position left before its last
    u, p = select_samples(train, None)
    assert p.tolist() == [1, 2, 3, 4, 5, 1]
