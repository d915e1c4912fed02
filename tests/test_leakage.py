"""No validation or test item reaches training: windows, teacher samples, retrieval histories, tune samples.

Property tests on random interaction logs split by the real leave-one-out code. Every interaction gets
its own item id, so an item id names one position of one user's sequence: any validation or test
id seen in a training input is a leak, whatever the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.data.candidates import select_samples, write_candidates
from pipeline.errors import UsageError
from pipeline.data.prepare import PrepareConfig, build_sequences
from pipeline.data.prepared import load_prepared
from pipeline.data.sequences import training_windows
from pipeline.teacher.dump import load_inputs
from pipeline.teacher.tune_data import training_prefixes
from tests.teacher_fixtures import make_inputs

lengths = st.lists(st.integers(min_value=3, max_value=14), min_size=1, max_size=7)


def split(lens: list[int], seed: int) -> tuple[list[np.ndarray], set[int]]:
    """Random log with one item per interaction (ties in time included) -> (train, held-out item ids)."""
    rng = np.random.default_rng(seed)
    rows, item = [], 0
    for u, n in enumerate(lens):
        for t in rng.integers(0, 5, size=n):  # few distinct timestamps: ties are kept in file order
            rows.append((f"u{u}", f"i{item:05d}", float(t), len(rows)))
            item += 1
    inter = pl.DataFrame(rows, schema=["user", "item", "ts", "row"], orient="row")
    seqs, _, _ = build_sequences(inter, None, PrepareConfig())
    train = [np.asarray(t, dtype=np.int64) for t in seqs["train"].to_list()]
    held = set(seqs["valid"].to_list()) | set(seqs["test"].to_list())
    assert sum(map(len, train)) + len(held) == len(rows)  # nothing lost, nothing doubled
    return train, held


@settings(max_examples=60, deadline=None)
@given(lens=lengths, seed=st.integers(0, 2**16), max_len=st.integers(1, 6), data=st.data())
def test_training_windows_hold_only_training_items(lens, seed, max_len, data):
    """Fails if a window reaches past the training sequence (e.g. `s[start + 1:end + 2]`) or drops or
    repeats a training target."""
    stride = data.draw(st.integers(1, max_len))
    train, held = split(lens, seed)
    x, y = training_windows(train, max_len, stride)
    seen = set(x[x > 0].tolist()) | set(y[y > 0].tolist())
    assert not seen & held
    expected = sorted(int(i) for s in train for i in s[1:])  # every next-item target, once
    assert sorted(y[y > 0].tolist()) == expected


class _Stop(Exception):
    pass


def test_fit_trains_on_windows_of_the_training_sequences_only(monkeypatch):
    """Fails if `fit` builds its windows from anything but `prepared.train` (e.g. train + validation)."""
    import pipeline.student.train as train_mod
    from pipeline.data.prepared import Prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig

    train, held = split([5, 9, 4, 12, 7], seed=3)
    n_items = sum(map(len, train)) + len(held)
    seen = {}

    def spy(seqs, max_len, stride=None):
        seen["windows"] = training_windows(seqs, max_len, stride)
        raise _Stop

    monkeypatch.setattr(train_mod, "training_windows", spy)
    valid = np.array(sorted(held)[: len(train)])  # held-out ids; which is which does not matter here
    prepared = Prepared([f"u{i}" for i in range(len(train))], train, valid, valid, pl.DataFrame(), n_items, "fp")
    with pytest.raises(_Stop):
        train_mod.fit(SASRec(SasrecConfig(n_items=n_items, hidden=8, max_len=4)), prepared,
                      train_mod.TrainConfig(epochs=1), show_progress=False)
    x, y = seen["windows"]
    assert not (set(x[x > 0].tolist()) | set(y[y > 0].tolist())) & held


@settings(max_examples=60, deadline=None)
@given(lens=lengths, seed=st.integers(0, 2**16), per_user=st.one_of(st.none(), st.integers(1, 5)),
       skip_last=st.integers(0, 3))
def test_teacher_samples_and_retrieval_histories_are_training_prefixes(lens, seed, per_user, skip_last):
    """Fails if a teacher sample's target or history can be a validation/test item (position ==
    len(train), or a history cut at position + 1)."""
    train, held = split(lens, seed)
    users, positions = select_samples(train, per_user, skip_last)
    for u, p in zip(users.tolist(), positions.tolist()):
        assert 1 <= p < len(train[u])
        assert int(train[u][p]) not in held  # the target
        assert not set(train[u][:p].tolist()) & held  # the history retrieve and the teacher see
        assert int(train[u][p]) not in set(train[u][:p].tolist())  # the target is not in its own history
    # the teacher-tune samples too
    tu, tp = training_prefixes(train, np.arange(len(train)))
    assert all(1 <= p < len(train[u]) for u, p in zip(tu.tolist(), tp.tolist()))
    assert len(tu) == sum(len(t) - 1 for t in train if len(t) >= 2)


def test_retrieve_builds_histories_from_training_prefixes(tmp_path: Path, monkeypatch):
    """Fails if `gedistill retrieve` gives the retriever a history that includes the target or a held-out
    item. The retriever is stubbed: only the histories it is handed matter here."""
    import stages.retrieve as retrieve_stage
    from stages.cli import app

    prepared, _ = make_inputs(tmp_path / "in", n_users=4, per_user=1)
    data = load_prepared(prepared)
    seen: list[np.ndarray] = []

    def fake_top_k(model, histories, k, batch=512):
        seen.extend(np.asarray(h) for h in histories)
        cands = np.array([[i for i in range(1, data.n_items + 1) if i not in h][:k] for h in histories], np.int32)
        return cands, -np.tile(np.arange(k, dtype=np.float32), (len(histories), 1))

    monkeypatch.setattr(retrieve_stage, "load_student", lambda path: (None, {"prepared_fingerprint": data.fingerprint}))
    monkeypatch.setattr(retrieve_stage, "top_k", fake_top_k)
    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"stub")
    out = tmp_path / "cands.parquet"
    result = CliRunner().invoke(app, ["retrieve", "--prepared", str(prepared), "--student", str(student),
                                      "--out", str(out), "--k", "4", "--samples-per-user", "3"])
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert len(seen) == frame.height == 12
    for h, row in zip(seen, frame.iter_rows(named=True)):
        u, p = row["user_idx"], row["position"]
        assert p < len(data.train[u]) and row["target"] == data.train[u][p]
        assert h.tolist() == data.train[u][:p].tolist()  # exactly the prefix before the target
        assert not {int(data.valid[u]), int(data.test[u])} & set(h.tolist())


def _candidates_with(tmp_path: Path, position_of_last: int | None = None, target_shift: int = 0) -> tuple[Path, Path]:
    """make_inputs' files, with the last sample moved to `position_of_last` (its target as stored there)."""
    prepared, path = make_inputs(tmp_path / "in")
    data = load_prepared(prepared)
    df = pl.read_parquet(path)
    users, pos, tgt = df["user_idx"].to_numpy(), df["position"].to_numpy().copy(), df["target"].to_numpy().copy()
    u = int(users[-1])
    if position_of_last is not None:
        pos[-1] = position_of_last
        full = list(data.train[u]) + [int(data.valid[u]), int(data.test[u])]
        tgt[-1] = full[position_of_last]  # a consistent-looking row: the validation item as target
    tgt[-1] += target_shift
    cands = np.stack(df["candidates"].to_numpy())
    write_candidates(path, users, pos, tgt, cands, np.stack(df["retriever_scores"].to_numpy()),
                     {"prepared_fingerprint": data.fingerprint, "selection": "edited"})
    return prepared, path


def test_teacher_dump_refuses_a_sample_at_the_end_of_training(tmp_path: Path):
    """Fails if teacher-dump accepts a row at position == len(train): its target is the validation item,
    and the teacher would be shown it."""
    prepared, path = _candidates_with(tmp_path)
    load_inputs(prepared, path)  # the untouched file loads
    data = load_prepared(prepared)
    last_user = int(pl.read_parquet(path)["user_idx"][-1])
    n = len(data.train[last_user])
    for position in (n, n + 1):
        prepared, path = _candidates_with(tmp_path / str(position), position_of_last=position)
        with pytest.raises(UsageError, match=rf"position {position}, training length {n}\).*validation or test"):
            load_inputs(prepared, path)


def test_teacher_dump_refuses_a_target_that_is_not_the_training_item(tmp_path: Path):
    """Fails if a candidates row whose target disagrees with the prepared sequence is accepted."""
    prepared, path = _candidates_with(tmp_path, target_shift=1)
    with pytest.raises(UsageError, match="target is not the training item at its position"):
        load_inputs(prepared, path)


def test_installed_teacher_dump_exits_2_on_a_leaking_sample(tmp_path: Path):
    """What users run: exit 2, the message names the row and says what to do, no traceback."""
    from tests.test_entrypoint import run_gedistill

    data_dir = tmp_path / "d"
    prepared, path = make_inputs(data_dir)
    data = load_prepared(prepared)
    last_user = int(pl.read_parquet(path)["user_idx"][-1])
    prepared, path = _candidates_with(tmp_path / "bad", position_of_last=len(data.train[last_user]))
    r = run_gedistill("teacher-dump", "--prepared", str(prepared), "--candidates", str(path),
                      "--out", str(tmp_path / "store"))
    assert r.returncode == 2, r.stderr
    assert "not training prefixes" in r.stderr and "gedistill retrieve" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()
