import math

import numpy as np
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.losses_distill import (
    embedding_loss,
    importance_weights,
    listnet_loss,
    ranks_from_ranking,
    teacher_distribution,
)
from pipeline.teacher_stream import TeacherStream
from tests.distill_helpers import teacher_rows, write_store


# ---------------------------------------------------------------- pure losses

def test_ranks_invert_the_ranking():
    ranking = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert ranks_from_ranking(ranking).tolist() == [[1, 2, 0], [0, 1, 2]]


def test_rank_target_is_a_decreasing_distribution():
    ranks = torch.tensor([[1, 2, 0, 3]])
    q = teacher_distribution(ranks, None, "ranking", temperature=1.0)
    assert torch.allclose(q.sum(1), torch.ones(1))
    assert q[0].argsort(descending=True).tolist() == [2, 0, 1, 3]
    assert math.isclose(float(q[0, 2] / q[0, 0]), math.e, rel_tol=1e-5)
    sharper = teacher_distribution(ranks, None, "ranking", temperature=0.1)
    assert sharper[0, 2] > 0.99


def test_score_target_is_the_softmax_of_stored_scores():
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    q = teacher_distribution(torch.zeros(1, 3, dtype=torch.long), scores, "scores", temperature=2.0)
    assert torch.allclose(q, torch.softmax(scores / 2.0, 1))
    with pytest.raises(ValueError, match="scores"):
        teacher_distribution(torch.zeros(1, 3, dtype=torch.long), None, "scores", 1.0)


def test_listnet_is_minimal_when_student_matches_teacher():
    q = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0]]), 1)
    s = q.log().clone().requires_grad_(True)
    loss = listnet_loss(s, q)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-6)
    entropy = -(q * q.log()).sum()
    assert math.isclose(float(loss.detach()), float(entropy), rel_tol=1e-5)
    assert float(listnet_loss(torch.tensor([[-1.0, 0.0, 2.0, 0.0]]), q)) > float(loss)


def test_importance_weights_off_gives_plain_listnet():
    ranks = torch.tensor([[0, 1, 2, 3]])
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, torch.randn(1, 4))
    assert torch.equal(w, torch.ones(1, 4))


def test_position_weight_favours_the_teachers_top_items():
    ranks = torch.tensor([[3, 0, 2, 1]])
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, torch.randn(1, 4), gamma_position=1.0, position_beta=1.0)
    assert w[0].argsort(descending=True).tolist() == [1, 3, 2, 0]
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)


def test_confidence_weight_trusts_a_peaked_teacher_more():
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    scores = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    q = teacher_distribution(ranks, scores, "scores", 1.0)
    w = importance_weights(ranks, q, torch.randn(2, 3), gamma_confidence=1.0)
    assert float(w[0, 0]) > float(w[1, 0]) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)


def test_agreement_weight_marks_shared_top_items():
    ranks = torch.tensor([[0, 1, 2, 3]])
    student = torch.tensor([[5.0, -1.0, 4.0, 0.0]])  # student top-2: 0 and 2; teacher top-2: 0 and 1
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, student, gamma_agreement=1.0, agreement_k=2)
    assert w[0, 0] > 0 and torch.all(w[0, 1:] == 0)
    with pytest.raises(ValueError, match="gammas"):
        importance_weights(ranks, q, student, gamma_agreement=0.8, gamma_position=0.5)


def test_embedding_losses_and_the_collapse_they_allow():
    g = torch.Generator().manual_seed(0)
    p, u = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    assert math.isclose(float(embedding_loss(p, u, "mse")), float(((p - u) ** 2).sum(1).mean()), rel_tol=1e-6)
    # MSE rewards shrinking both sides: the collapse the norms are logged for
    assert embedding_loss(0.01 * p, 0.01 * u, "mse") < 0.01 * embedding_loss(p, u, "mse")
    # cosine and standardized are scale-free, so shrinking gains nothing
    for kind in ("cosine", "standardized"):
        assert math.isclose(float(embedding_loss(0.1 * p, 0.1 * u, kind)), float(embedding_loss(p, u, kind)), rel_tol=1e-3)
    assert float(embedding_loss(p, 3 * p, "cosine")) < 1e-6
    assert float(embedding_loss(p, 2 * p + 5, "standardized")) < 1e-6
    # a constant (collapsed) student gets no credit from the standardized loss
    assert float(embedding_loss(p, torch.ones(16, 8), "standardized")) > 0.9


# ---------------------------------------------------------------- streaming the store

def _toy_train(n_users=40, length=12, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=length) for _ in range(n_users)]


def test_stream_covers_the_store_shuffled_and_deterministic(tmp_path):
    train = _toy_train()
    cols = teacher_rows(train, 50, k=5, width=8, last_m=4)  # 160 rows
    shards = write_store(tmp_path, cols, shards=3, row_group_rows=16)
    n = len(cols["sample_id"])

    def take(seed, n_batches):
        it = iter(TeacherStream(shards, 16, buffer_rows=48, read_rows=8, seed=seed))
        return [next(it) for _ in range(n_batches)]

    batches = take(1, 3 * n // 16)  # three passes' worth
    ids = np.concatenate([b.sample_id for b in batches])
    counts = np.bincount(ids, minlength=n)
    assert counts.min() >= 2 and counts.max() <= 4  # every row, about three times
    assert not np.array_equal(ids[:n], np.arange(n))  # shuffled
    again = np.concatenate([b.sample_id for b in take(1, 10)])
    assert np.array_equal(again, ids[:160])
    other = np.concatenate([b.sample_id for b in take(2, 10)])
    assert not np.array_equal(other, ids[:160])
    b = batches[0]
    assert b.candidates.shape == (16, 5) and b.ranking.shape == (16, 5) and b.h_dec.shape == (16, 8)
    assert b.h_dec.dtype == np.float16
    # rows stay aligned: the stored target is the user's item at the stored position
    for u, p, t in zip(b.user_idx, b.position, b.target):
        assert train[u][p] == t


def test_stream_drops_failed_rows_and_empty_histories(tmp_path):
    train = _toy_train(n_users=10, length=4)
    cols = teacher_rows(train, 50, k=5, width=8, last_m=4)  # includes position 1..3
    cols["status"] = ["failed" if i % 2 else "ok" for i in range(len(cols["status"]))]
    cols["position"][0] = 0
    shards = write_store(tmp_path, cols, shards=1, row_group_rows=7)
    it = iter(TeacherStream(shards, 4, buffer_rows=8, seed=0))
    ids = np.concatenate([next(it).sample_id for _ in range(10)])
    assert np.all(ids % 2 == 0) and 0 not in ids


def test_config_refuses_bad_settings():
    from pipeline.distill import DistillConfig

    with pytest.raises(UsageError, match="emb_loss"):
        DistillConfig(emb_loss="l1")
    with pytest.raises(UsageError, match="gammas"):
        DistillConfig(gamma_position=0.7, gamma_agreement=0.7)
