"""The teacher report over a store read in batches (docs/MUTATION.md: 17% of this module's mutants survived its
first tests, which fed it one batch): every count adds up across batches, a batch that reaches only some
positions still counts in K slots, and the shares and rates are exact for one sample and for many."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.teacher_quality import TeacherQuality, rank_from_scores, ranks_of_target

K = 4


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cands = np.stack([rng.permutation(np.arange(1, 30))[:K] for _ in range(n)])
    ranking = np.stack([rng.permutation(K) for _ in range(n)])
    target = np.where(rng.random(n) < 0.8, cands[np.arange(n), rng.integers(0, K, n)], 99)  # some absent
    status = rng.choice(np.array(["ok", "repaired", "failed", "cut", "no_decision"], dtype=object), n)
    student = rng.normal(size=(n, K))
    return cands, ranking, target, status, student


def _report(batches, students=("s",)) -> dict:
    q = TeacherQuality(K, students)
    for cands, ranking, target, status, student in batches:
        q.update(cands, ranking, target, status, {"s": student} if students else None)
    return q.result()


def test_a_store_read_in_batches_reports_what_it_reports_read_whole():
    whole = _samples(60)
    parts = [tuple(a[i:i + 7] for a in whole) for i in range(0, 60, 7)]
    assert _report(parts) == _report([whole])
    r = _report(parts)
    assert r["samples"] == 60 and sum(r["status_counts"].values()) == 60
    assert r["teacher"]["samples_scored"] == r["s"]["samples_scored"] > 0


def test_a_batch_whose_choices_reach_only_the_first_positions_still_counts_in_k_slots():
    cands = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    ranking = np.array([[0, 1, 2, 3], [0, 2, 1, 3]])  # the teacher's first choice: position 0 both times
    target = np.array([1, 2])  # at ranks 0 and 2
    status = np.array(["ok", "ok"], dtype=object)
    student = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])  # ranks 0 and 1
    q = TeacherQuality(K, ("s",))
    q.update(cands, ranking, target, status, {"s": student})
    q.update(cands[:0], ranking[:0], target[:0], status[:0], {"s": student[:0]})  # an empty batch
    r = q.result()
    assert r["top1_position_counts"] == [2, 0, 0, 0]
    assert all(type(c) is int for c in r["top1_position_counts"])  # JSON says 2, not 2.0
    assert r["teacher"]["rank_share"] == [0.5, 0.0, 0.5, 0.0]
    assert r["s"]["rank_share"] == [0.5, 0.5, 0.0, 0.0]


def test_shares_and_rates_for_one_sample_and_rounded_to_four_places():
    one = TeacherQuality(K)
    one.update(np.array([[1, 2, 3, 4]]), np.array([[3, 0, 1, 2]]), np.array([4]), np.array(["cut"], dtype=object))
    r = one.result()
    assert r["k"] == K and r["samples"] == 1
    assert r["target_in_candidates"] == 1.0 and r["cut_rate"] == 1.0
    assert r["parse_failure_rate"] == r["repaired_rate"] == r["no_decision_rate"] == 0.0
    assert r["top1_position_share"] == [0.0, 0.0, 0.0, 1.0] and r["top1_most_common_share"] == 1.0
    assert r["teacher"] == {"ndcg@k_where_present": 1.0, "hr@1_where_present": 1.0, "mean_rank_where_present": 0.0,
                            "samples_scored": 1, "rank_share": [1.0, 0.0, 0.0, 0.0]}
    for status, key in (("failed", "parse_failure_rate"), ("repaired", "repaired_rate"),
                        ("no_decision", "no_decision_rate")):
        q = TeacherQuality(K)
        q.update(np.array([[1, 2, 3, 4]]), np.array([[0, 1, 2, 3]]), np.array([9]), np.array([status], dtype=object))
        assert q.result()[key] == 1.0 and q.result()["target_in_candidates"] == 0.0
    three = TeacherQuality(K)
    three.update(np.tile([[1, 2, 3, 4]], (3, 1)), np.array([[0, 1, 2, 3], [1, 0, 2, 3], [1, 2, 0, 3]]),
                 np.array([1, 1, 1]), np.array(["ok"] * 3, dtype=object))
    r = three.result()
    assert r["top1_position_share"] == [0.3333, 0.6667, 0.0, 0.0]
    assert r["top1_most_common_share"] == 2 / 3
    assert r["teacher"]["rank_share"] == [0.3333, 0.3333, 0.3333, 0.0]
    assert r["teacher"]["mean_rank_where_present"] == 1.0
    json.dumps(r)  # what `evaluate` writes


def test_an_empty_report_divides_by_one_not_zero():
    r = TeacherQuality(K, ("s",)).result()
    assert r["samples"] == 0 and r["target_in_candidates"] == 0.0 and r["top1_most_common_share"] == 0.0
    assert r["s"]["samples_scored"] == 0 and r["s"]["rank_share"] == [0.0] * K


def test_the_targets_index_is_minus_one_where_absent():
    present, index = ranks_of_target(np.array([[5, 6, 7], [5, 6, 7], [7, 5, 6]]), np.array([7, 9, 7]))
    assert present.tolist() == [True, False, True] and index.tolist() == [2, -1, 0]


def test_ranks_from_float32_scores_and_the_refusal_of_infinity():
    s = np.array([[0.1, 0.3, 0.2]], dtype=np.float32)
    assert rank_from_scores(s, np.array([2])).tolist() == [1]
    with pytest.raises(ValueError) as e:
        rank_from_scores(np.array([[np.inf, 0.0, 1.0]]), np.array([1]))
    assert str(e.value) == "non-finite candidate scores: the model that produced them has diverged"
