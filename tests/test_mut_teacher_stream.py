"""Stage two's reader of the store, the parts its first tests left open (docs/MUTATION.md: 70% of this module's
mutants survived none of them): no row lost between passes, batches of exactly the size asked for on both paths,
the memory bound's read chunks and columns, what a row must be to train on (status, position), stores a stranger
wrote without the optional columns, and the errors a malformed store gets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.student import teacher_stream
from pipeline.student.teacher_stream import COLUMNS, TeacherStream, batch_from_arrow, teacher_width
from tests.distill_helpers import teacher_rows, write_store
from tests.test_perf_stream import _train


@pytest.fixture
def store(tmp_path):
    cols = teacher_rows(_train(), 40, k=5, width=8, last_m=3)  # 90 rows
    return cols, write_store(tmp_path / "s", cols, shards=3, row_group_rows=7)


def _record_batch(cols: dict[str, list], rows=slice(None), drop=()) -> pa.RecordBatch:
    data = {
        "sample_id": pa.array(cols["sample_id"][rows], pa.int64()),
        "user_idx": pa.array(cols["user_idx"][rows], pa.int32()),
        "position": pa.array(cols["position"][rows], pa.int32()),
        "target": pa.array(cols["target"][rows], pa.int32()),
        "candidates": pa.array(cols["candidates"][rows], pa.list_(pa.int32())),
        "ranking": pa.array(cols["ranking"][rows], pa.list_(pa.int16())),
        "scores": pa.array(cols["scores"][rows], pa.list_(pa.float32())),
        "h_dec": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([np.zeros(0, np.float16), *cols["h_dec"][rows]]), pa.float16()),
            len(cols["h_dec"][0])),
        "status": pa.array(cols["status"][rows], pa.string()),
    }
    return pa.RecordBatch.from_pydict({k: v for k, v in data.items() if k not in drop})


@pytest.mark.parametrize("buffer_rows, read_rows", [(128, 4), (24, 5)], ids=["replayed", "streamed"])
def test_no_row_is_lost_between_passes_and_every_batch_is_full(store, buffer_rows, read_rows):
    """A pass of 90 rows in batches of 8 leaves 2 behind: they carry into the next pass. Dropping them (or a
    batch of another size) would lose rows for good: after 30 passes the rows delivered would trail the rows
    read by more than what the buffer can hold."""
    _, shards = store
    stream = TeacherStream(shards, 8, buffer_rows=buffer_rows, read_rows=read_rows, seed=5)
    it = iter(stream)
    seen: Counter[int] = Counter()
    emitted = 0
    while stream.passes < 30:
        b = next(it)
        assert len(b) == 8 and b.candidates.shape == (8, 5) and b.h_dec.shape == (8, 8)
        emitted += 8
        seen.update(b.sample_id.tolist())
    assert set(seen) == set(range(90))  # every row, nothing invented
    assert stream.rows_read - emitted < buffer_rows + read_rows + 8
    assert stream.rows_read >= 30 * 90


def test_passes_and_rows_read_count_from_zero(store):
    _, shards = store
    stream = TeacherStream(shards, 10, buffer_rows=128, seed=0)
    assert stream.passes == 0 and stream.rows_read == 0
    it = iter(stream)
    first = [next(it) for _ in range(9)]  # 90 rows: the whole first pass, emitted at its end
    assert stream.passes == 1 and stream.rows_read == 90
    assert sorted(np.concatenate([b.sample_id for b in first]).tolist()) == list(range(90))


def test_the_default_seed_is_zero(store):
    _, shards = store
    a, b = iter(TeacherStream(shards, 8)), iter(TeacherStream(shards, 8, seed=0))
    for _ in range(12):
        assert np.array_equal(next(a).sample_id, next(b).sample_id)


def test_reads_only_the_training_columns_in_chunks_of_read_rows(tmp_path, monkeypatch):
    """The memory bound: a store's prompts (kilobytes a row) are never read, and a row group is read
    `read_rows` at a time."""
    cols = teacher_rows(_train(), 40, k=5, width=8, last_m=3)
    shards = write_store(tmp_path, cols, shards=1, row_group_rows=64)
    table = pq.read_table(shards[0]).append_column("prompt", pa.array(["x" * 100] * 90))
    pq.write_table(table.drop(["scores"]), shards[0], row_group_size=64)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, **kw):
        calls.append(kw)
        for rb in real(self, **kw):
            assert rb.num_rows <= 6 and "prompt" not in rb.schema.names
            yield rb

    monkeypatch.setattr(teacher_stream.pq.ParquetFile, "iter_batches", spy)
    stream = TeacherStream(shards, 8, buffer_rows=16, read_rows=6, seed=0)
    assert stream.columns == [c for c in COLUMNS if c != "scores"]
    assert TeacherStream(shards, 8, columns=["sample_id", "h_dec", "prompt", "nope"]).columns == [
        "sample_id", "h_dec", "prompt"]  # asked-for columns the store has, in the order asked
    it = iter(stream)
    b = next(it)
    assert b.scores.shape == (8, 0) and b.scores.dtype == np.float32  # no scores column: empty, not a crash
    assert calls and all(c["batch_size"] == 6 and c["columns"] == stream.columns and len(c["row_groups"]) == 1
                         for c in calls)


def test_rows_that_train_are_decision_states_with_a_history(store):
    cols, _ = store
    cols = {k: list(v) for k, v in cols.items()}
    cols["status"][:6] = ["ok", "repaired", "cut", "failed", "no_decision", "ok"]
    cols["position"][5] = 0  # an empty history
    cols["position"][0] = 1  # the shortest history: kept
    rb = _record_batch(cols, slice(0, 6))
    assert batch_from_arrow(rb).sample_id.tolist() == [0, 1, 2]
    assert batch_from_arrow(rb, skip_failed=False).sample_id.tolist() == [0, 1, 2, 3, 4]  # position 0 still out
    assert batch_from_arrow(rb, min_position=0, skip_failed=False).sample_id.tolist() == [0, 1, 2, 3, 4, 5]
    no_status = _record_batch(cols, slice(0, 6), drop=("status",))
    assert batch_from_arrow(no_status).sample_id.tolist() == [0, 1, 2, 3, 4]  # nothing to filter on but position


def test_the_stream_keeps_failed_rows_when_asked(tmp_path):
    cols = teacher_rows(_train(n_users=4), 40, k=5, width=8, last_m=3)  # 12 rows
    cols["status"] = ["failed"] * 12
    shards = write_store(tmp_path, cols, shards=1, row_group_rows=12)
    stream = TeacherStream(shards, 4, buffer_rows=8, seed=0)
    with pytest.raises(ValueError) as e:
        next(iter(stream))
    assert str(e.value) == "the teacher store holds no usable rows (all failed or empty histories)"
    assert (stream.passes, stream.rows_read) == (1, 12)  # one pass tells: a second reads the same rows again
    b = next(iter(TeacherStream(shards, 4, buffer_rows=8, seed=0, skip_failed=False)))
    assert len(b) == 4


def test_a_record_batch_converts_with_its_types_one_row_or_none(store):
    cols, _ = store
    one = batch_from_arrow(_record_batch(cols, slice(3, 4)))
    assert one.sample_id.tolist() == [3] and one.candidates.tolist() == [cols["candidates"][3]]
    assert one.ranking.tolist() == [cols["ranking"][3]] and one.scores.dtype == np.float32
    assert one.h_dec.dtype == np.float16 and one.h_dec.shape == (1, 8)
    assert {one.sample_id.dtype, one.user_idx.dtype, one.position.dtype, one.target.dtype,
            one.candidates.dtype, one.ranking.dtype} == {np.dtype(np.int64)}
    none = batch_from_arrow(_record_batch(cols, slice(0, 0)))
    assert len(none) == 0 and none.candidates.shape == (0, 0) and none.h_dec.shape == (0, 0)


@pytest.mark.parametrize("column", ["candidates", "ranking", "scores"])
def test_a_ragged_list_column_is_refused_naming_it(store, column):
    cols, _ = store
    cols = {k: list(v) for k, v in cols.items()}
    cols[column][2] = cols[column][2][:-1]
    with pytest.raises(ValueError) as e:
        batch_from_arrow(_record_batch(cols, slice(0, 4)))
    assert str(e.value) == f"column {column!r} has rows of different lengths; the store is malformed"


def test_bad_stream_settings_and_stores_are_refused(store, tmp_path):
    _, shards = store
    for bs, buf in ((0, 10), (11, 10)):
        with pytest.raises(ValueError) as e:
            TeacherStream(shards, bs, buffer_rows=buf)
        assert str(e.value) == f"need 1 <= batch_size <= buffer_rows, got {bs}, {buf}"
    assert len(next(iter(TeacherStream(shards, 1, buffer_rows=1, seed=0)))) == 1  # the bounds themselves are fine
    assert len(next(iter(TeacherStream(shards, 10, buffer_rows=10, seed=0)))) == 10
    with pytest.raises(ValueError) as e:
        TeacherStream([], 4)
    assert str(e.value) == "the teacher store holds no row groups"
    assert teacher_width(shards) == 8
    t = pq.read_table(shards[0])
    h = pa.array([list(map(float, v)) for v in t.column("h_dec").to_pylist()], pa.list_(pa.float32()))
    pq.write_table(t.set_column(t.schema.get_field_index("h_dec"), "h_dec", h), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError) as e:
        teacher_width([tmp_path / "ragged.parquet"])
    assert str(e.value) == "h_dec must be a fixed_size_list, found list<element: float>"
