"""TeacherStream replays a store that fits in its buffer from memory (issue 10): same batches, no re-read.

Catches (each break tried, seen failing): replaying the cached chunks in read order instead of the
pass's seeded row-group order (the batches differ from a fresh read after the first pass); caching a
store larger than the buffer (the memory bound would then grow with the store: the size test fails);
a cache that is filled but never used (the no-read-after-the-first-pass test fails).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.student import teacher_stream
from pipeline.student.teacher_stream import TeacherStream
from tests.distill_helpers import teacher_rows, write_store


def _train(n_users=30, length=10, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=length) for _ in range(n_users)]


def _ids(stream: TeacherStream, n_batches: int) -> list[np.ndarray]:
    it = iter(stream)
    out = []
    for _ in range(n_batches):
        b = next(it)
        out.append(np.concatenate([b.sample_id, b.h_dec.view(np.int16).ravel(), b.ranking.ravel()]))
    return out


def test_replayed_passes_equal_fresh_reads(tmp_path):
    cols = teacher_rows(_train(), 40, k=5, width=8, last_m=3)  # 90 rows
    shards = write_store(tmp_path, cols, shards=3, row_group_rows=7)
    cached = TeacherStream(shards, 8, buffer_rows=128, read_rows=4, seed=3)
    fresh = TeacherStream(shards, 8, buffer_rows=128, read_rows=4, seed=3)
    fresh._cache = None  # the streaming path, reading every pass from the files
    assert cached._cache is not None
    a, b = _ids(cached, 60), _ids(fresh, 60)  # over five passes
    assert cached.passes >= 4 and cached.passes == fresh.passes and cached.rows_read == fresh.rows_read
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_no_parquet_read_after_the_first_pass(tmp_path, monkeypatch):
    cols = teacher_rows(_train(), 40, k=5, width=8, last_m=3)
    shards = write_store(tmp_path, cols, shards=2, row_group_rows=16)
    stream = TeacherStream(shards, 8, buffer_rows=128, seed=0)
    it = iter(stream)
    while stream.passes < 1:
        next(it)
    next(it)  # the second pass may already have started from the cache

    def refuse(*a, **k):
        raise AssertionError("the store was read again")

    monkeypatch.setattr(teacher_stream.pq, "ParquetFile", refuse)
    for _ in range(40):
        next(it)
    assert stream.passes >= 3


def test_a_store_larger_than_the_buffer_is_streamed(tmp_path):
    cols = teacher_rows(_train(), 40, k=5, width=8, last_m=3)  # 90 rows
    shards = write_store(tmp_path, cols, shards=2, row_group_rows=16)
    assert sum(pq.ParquetFile(s).metadata.num_rows for s in shards) == 90
    assert TeacherStream(shards, 8, buffer_rows=89, seed=0)._cache is None
    assert TeacherStream(shards, 8, buffer_rows=90, seed=0)._cache is not None
