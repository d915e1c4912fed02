"""Rows that are not decision states never train the student; ties never favour a candidate in the teacher report."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluation.teacher_quality import rank_from_scores
from pipeline.student.teacher_stream import batch_from_arrow


def _batch(statuses: list[str]) -> pa.RecordBatch:
    n, k, h = len(statuses), 3, 4
    return pa.RecordBatch.from_pydict({
        "sample_id": pa.array(range(n), pa.int64()), "user_idx": pa.array([0] * n, pa.int32()),
        "position": pa.array([2] * n, pa.int32()), "target": pa.array([5] * n, pa.int32()),
        "candidates": pa.array([[5, 6, 7]] * n, pa.list_(pa.int32())),
        "ranking": pa.array([[0, 1, 2]] * n, pa.list_(pa.int16())),
        "scores": pa.array([[1.0, 0.5, 0.0]] * n, pa.list_(pa.float32())),
        "h_dec": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * h, np.float16)), h),
        "status": pa.array(statuses, pa.string()),
    })


def test_stream_keeps_only_decision_states():
    """Fails if only `failed` rows are dropped: a generate-mode row whose first token was no identifier
    (`no_decision`) has an h_dec that is not the decision state, and must not feed the embedding loss."""
    b = batch_from_arrow(_batch(["ok", "repaired", "cut", "failed", "no_decision"]))
    assert sorted(np.asarray(b.sample_id).tolist()) == [0, 1, 2]


def test_teacher_report_ranks_ties_pessimistically_and_refuses_nan():
    """Fails on the strict `>` count: constant student scores put the target first (NDCG 1.0)."""
    scores = np.zeros((2, 4))
    assert rank_from_scores(scores, np.array([0, 3])).tolist() == [3, 3]
    s = np.array([[0.1, 0.9, 0.9, 0.2]])
    assert rank_from_scores(s, np.array([1])).tolist() == [1]  # tied with one other: behind it
    assert rank_from_scores(s, np.array([3])).tolist() == [2]
    with pytest.raises(ValueError, match="non-finite"):
        rank_from_scores(np.array([[np.nan, 0.0, 1.0]]), np.array([0]))
