"""CLI smoke tests: exit codes and output of prepare, student-train and retrieve on tiny data."""

import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.data.candidates import read_candidates
from pipeline.student.checkpoint import load_student
from pipeline.data.prepared import load_prepared
from pipeline.student.train import evaluate
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

    from pipeline.data.candidates import select_samples

    train = [np.arange(1, 7), np.arange(1, 3)]  # lengths 6 and 2
    u, p = select_samples(train, 2)
    assert list(zip(u.tolist(), p.tolist())) == [(0, 4), (0, 5), (1, 1)]
    u, p = select_samples(train, 1, skip_last=1)
    assert list(zip(u.tolist(), p.tolist())) == [(0, 4)]  # user 1 has no position left before its last
    u, p = select_samples(train, None)
    assert p.tolist() == [1, 2, 3, 4, 5, 1]


# --- options that would be accepted and ignored are refused (issue 9 item 5) ---------------------

TEACHER_ONLY = [
    ("--w-rank", "0.5"), ("--lambda-emb", "2"), ("--emb-loss", "mse"), ("--teacher-target", "scores"),
    ("--teacher-temperature", "2"), ("--gamma-position", "0.3"), ("--gamma-confidence", "0.3"),
    ("--gamma-agreement", "0.3"), ("--calibrate",), ("--teacher-batch-size", "8"), ("--buffer-rows", "64"),
    ("--init", "baseline"), ("--baseline", "elsewhere"), ("--candidates", "c.parquet"),
]


@pytest.mark.parametrize("option", TEACHER_ONLY, ids=[o[0] for o in TEACHER_ONLY])
def test_distillation_options_without_a_store_are_refused(option, tmp_path: Path, capsys):
    """Fails if a distillation option given without --teacher-cache is accepted and ignored (the
    baseline then trains as if it had not been given)."""
    assert run(["student-train", "--prepared", str(tmp_path / "nothing"), *option]) == 2
    err = capsys.readouterr().err
    assert option[0] in err and "--teacher-cache" in err


def _fake_store(root: Path, mode: str = "first-token") -> tuple[Path, Path, Path]:
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

    prepared, cands = make_inputs(root / "in")
    store = root / f"store-{mode}"
    run_dump(DumpConfig(shard_rows=4, mode=mode), load_inputs(prepared, cands), FakeBackend(), FAKE_TEACHER, store)
    return prepared, cands, store


TINY = ["--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "6", "--epochs", "1", "--threads", "1",
        "--teacher-batch-size", "4", "--buffer-rows", "8"]


def test_baseline_path_without_init_baseline_is_refused(tmp_path: Path, capsys):
    """Fails if --baseline is accepted with --init scratch (it was read only for --init baseline)."""
    prepared, _, store = _fake_store(tmp_path)
    assert run(["student-train", "--prepared", str(prepared), "--teacher-cache", str(store),
                "--baseline", str(tmp_path / "b"), "--out", str(tmp_path / "s"), *TINY]) == 2
    assert "--init baseline" in capsys.readouterr().err
    assert not (tmp_path / "s" / "config.json").exists()


def test_calibrate_on_a_generated_ranking_is_refused(tmp_path: Path, capsys):
    """Fails if --calibrate silently replaces a generate-mode store's generated ranking with the
    re-ranked first-token scores. With --teacher-target scores (no rank weighting) the generated
    ranking is not used, so calibration is honest there and must still run."""
    prepared, _, store = _fake_store(tmp_path, "generate")
    common = ["student-train", "--prepared", str(prepared), "--teacher-cache", str(store), "--calibrate", *TINY]
    assert run([*common, "--out", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.json")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "generate-mode store" in err and "--teacher-target scores" in err
    assert not (tmp_path / "a" / "config.json").exists()
    assert run([*common, "--teacher-target", "scores", "--out", str(tmp_path / "b"),
                "--metrics", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b" / "config.json").is_file()


def test_calibrate_on_a_first_token_store_runs(tmp_path: Path):
    """The refusal is for generate-mode stores only: fails if --calibrate is refused on first-token."""
    prepared, _, store = _fake_store(tmp_path)
    assert run(["student-train", "--prepared", str(prepared), "--teacher-cache", str(store), "--calibrate",
                *TINY, "--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "s.json")]) == 0


@pytest.mark.parametrize("option", [("--tensor-parallel-size", "2"), ("--gpu-memory-utilization", "0.5")])
def test_hf_backend_refuses_vllm_only_options(option, tmp_path: Path, capsys):
    """Fails if `teacher-dump --backend hf` accepts an option only the vLLM engine reads (it would be ignored).
    (The vLLM backend honours --batch-size and --threads now: tests/test_vllm_engine.py.)"""
    assert run(["teacher-dump", "--backend", "hf", "--prepared", str(tmp_path / "none"), *option]) == 2
    err = capsys.readouterr().err
    assert option[0] in err and "vllm" in err


def test_history_holds_no_timings_and_identical_runs_are_byte_identical(tmp_path: Path, tiny_csv):
    """Fails if per-epoch seconds (or anything else machine-dependent) land in the checkpoint folder
    that DVC hashes: two identical runs must produce byte-identical folders. The timings go to
    <metrics-stem>.timing.json next to the metrics file instead."""
    inter, items = tiny_csv
    prep = tmp_path / "prep"
    assert run(["prepare", "--out", str(prep), "--interactions", str(inter), "--items", str(items)]) == 0
    for name in ("a", "b"):
        assert run(["student-train", "--prepared", str(prep), "--out", str(tmp_path / name),
                    "--metrics", str(tmp_path / f"m{name}" / "baseline.json"), "--hidden", "16", "--max-len", "8",
                    "--epochs", "2", "--threads", "1"]) == 0
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"model.safetensors", "config.json", "history.json", "ranks.parquet", "settings.json"} <= set(files_a)
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert len(history) == 2 and not any("seconds" in k for row in history for k in row)
    timing = json.loads((tmp_path / "ma" / "baseline.timing.json").read_text())
    assert [r["epoch"] for r in timing["epochs"]] == [1, 2] and all(r["train_seconds"] > 0 for r in timing["epochs"])


def test_a_failed_metrics_write_leaves_no_stale_metrics(tmp_path: Path, tiny_csv, monkeypatch):
    """Fails if the previous run's metrics file survives while the checkpoint is replaced: a kill (here a
    failing write) between the new checkpoint and the new metrics left old numbers beside new weights.
    The report also says whether training diverged (None here)."""
    import stages.train_student as ts

    inter, items = tiny_csv
    prep, out, metrics = tmp_path / "prep", tmp_path / "student", tmp_path / "m" / "baseline.json"
    assert run(["prepare", "--out", str(prep), "--interactions", str(inter), "--items", str(items)]) == 0
    args = ["student-train", "--prepared", str(prep), "--out", str(out), "--metrics", str(metrics),
            "--hidden", "16", "--max-len", "8", "--epochs", "2", "--threads", "1"]
    assert run(args) == 0
    assert json.loads(metrics.read_text())["diverged_epoch"] is None
    real = ts.write_text_atomic

    def fail_on_metrics(path, text):
        if Path(path) == metrics:
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(ts, "write_text_atomic", fail_on_metrics)
    assert run(args + ["--seed", "7"]) != 0
    assert not metrics.exists()
