"""Distillation losses against their documented formulas written out in numpy, plus the bounds and
messages mutation testing found untested (docs/MUTATION.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.student.losses_distill import (embedding_loss, importance_weights, listnet_loss, ranks_from_ranking,
                                     teacher_distribution)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.integers(1, 4).flatmap(lambda b: st.lists(st.permutations(range(6)), min_size=b, max_size=b)))
def test_ranks_are_the_inverse_permutation(rankings):
    """Fails if ranks[b, ranking[b, j]] != j for any row (e.g. positions written to the wrong places)."""
    ranking = torch.tensor(rankings)
    ranks = ranks_from_ranking(ranking)
    assert ranks.dtype == ranking.dtype
    for row, r in zip(rankings, ranks.tolist()):
        assert [r[i] for i in row] == list(range(6))


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_teacher_distribution_is_the_tempered_softmax():
    """Fails if the ranking target is not softmax(-rank / T) or the score target not softmax(score / T),
    computed in float for integer ranks."""
    ranks = torch.tensor([[2, 0, 1, 3]])
    scores = torch.tensor([[0.5, 2.0, -1.0, 0.0]], dtype=torch.float64)
    for t in (0.5, 2.0):
        np.testing.assert_allclose(teacher_distribution(ranks, None, "ranking", t).numpy(),
                                   _softmax(-np.array([[2, 0, 1, 3]]) / t), rtol=1e-6)
        np.testing.assert_allclose(teacher_distribution(ranks, scores, "scores", t).numpy(),
                                   _softmax(scores.numpy() / t), rtol=1e-6)
    assert teacher_distribution(ranks, None, "ranking", 1.0).dtype == torch.float32


def test_teacher_distribution_refuses_bad_arguments():
    """Fails if a temperature of 0 (or below) or an unknown target is accepted, or the messages change."""
    ranks = torch.zeros(1, 3, dtype=torch.long)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^temperature must be > 0, got {t}$"):
            teacher_distribution(ranks, None, "ranking", t)
    with pytest.raises(ValueError, match=r"^target='scores' needs the stored identifier scores$"):
        teacher_distribution(ranks, None, "scores", 1.0)
    with pytest.raises(ValueError, match=r"^unknown target 'logits'$"):
        teacher_distribution(ranks, None, "logits", 1.0)


def _weights_reference(ranks, probs, student, gp, gc, ga, beta, k_agree):
    """importance_weights' docstring, written out in numpy."""
    ranks, probs, student = ranks.numpy().astype(float), probs.numpy().astype(float), student.numpy()
    B, K = ranks.shape
    w = np.full((B, K), 1.0 - (gp + gc + ga))
    if gp:
        pos = np.exp(-ranks / beta)
        w += gp * pos / pos.mean(axis=1, keepdims=True)
    if gc:
        entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=1)
        conf = np.maximum(1 - entropy / math.log(K), 0)
        w += gc * (conf / max(conf.mean(), 1e-12))[:, None]
    if ga:
        k = min(k_agree, K)
        top = np.zeros((B, K), bool)
        for b in range(B):
            top[b, np.argsort(-student[b])[:k]] = True
        agree = (top & (ranks < k)).astype(float)
        w += ga * (agree / agree.mean() if agree.mean() > 0 else np.ones_like(agree))
    return w


@pytest.mark.parametrize("gammas", [(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0), (0.2, 0.3, 0.4), (0.5, 0.5, 0)])
@pytest.mark.parametrize("beta, k_agree", [(5.0, 5), (1.5, 2), (3.0, 9)])
def test_importance_weights_match_the_documented_formula(gammas, beta, k_agree):
    """Fails if any component (position exp(-rank/beta) normalized per row, confidence 1 - H/log K
    normalized over the batch, agreement of the two top-k normalized over the batch) or the
    (1 - sum gamma) base differs from the documented formula."""
    g = torch.Generator().manual_seed(7)
    B, K = 5, 7
    ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
    probs = torch.softmax(3 * torch.randn(B, K, generator=g), dim=1)
    student = torch.randn(B, K, generator=g)
    gp, gc, ga = gammas
    w = importance_weights(ranks, probs, student, gamma_position=gp, gamma_confidence=gc, gamma_agreement=ga,
                           position_beta=beta, agreement_k=k_agree)
    np.testing.assert_allclose(w.numpy(), _weights_reference(ranks, probs, student, gp, gc, ga, beta, k_agree),
                               rtol=1e-5, atol=1e-6)
    assert not w.requires_grad


def test_default_position_beta_and_agreement_k():
    """Fails if the defaults (beta 5, agreement top-5) change."""
    g = torch.Generator().manual_seed(1)
    ranks = torch.stack([torch.randperm(8, generator=g) for _ in range(3)])
    student = torch.randn(3, 8, generator=g)
    probs = torch.softmax(torch.randn(3, 8, generator=g), 1)
    np.testing.assert_allclose(importance_weights(ranks, probs, student, gamma_position=0.5, gamma_agreement=0.5),
                               _weights_reference(ranks, probs, student, 0.5, 0, 0.5, 5.0, 5), rtol=1e-5)


def test_agreement_with_nothing_in_common_falls_back_to_uniform():
    """Fails if a batch where the student's and teacher's top-k never meet gets zero (or NaN) weights
    instead of uniform ones."""
    ranks = torch.tensor([[0, 1, 2, 3]])
    student = torch.tensor([[-5.0, -4.0, 3.0, 4.0]])  # student top-2: 2, 3; teacher top-2: 0, 1
    w = importance_weights(ranks, torch.full((1, 4), 0.25), student, gamma_agreement=1.0, agreement_k=2)
    assert w.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_a_uniform_teacher_gets_no_confidence_and_weights_stay_finite():
    """Fails if zero confidence everywhere divides by zero, or the confidence is not clamped at 0."""
    probs = torch.full((2, 4), 0.25)
    w = importance_weights(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), probs, torch.randn(2, 4),
                           gamma_confidence=0.5)
    assert torch.isfinite(w).all() and w.tolist() == [[0.5] * 4, [0.5] * 4]


@pytest.mark.parametrize("gammas", [(-0.1, 0, 0), (0, -0.1, 0), (0, 0, -0.1), (0.5, 0.3, 0.3)])
def test_gammas_must_be_non_negative_and_sum_to_at_most_one(gammas):
    """Fails if a negative gamma or a sum above 1 is accepted."""
    with pytest.raises(ValueError, match=r"^importance gammas must be >= 0 and sum to at most 1$"):
        importance_weights(torch.tensor([[0, 1]]), torch.full((1, 2), 0.5), torch.zeros(1, 2),
                           gamma_position=gammas[0], gamma_confidence=gammas[1], gamma_agreement=gammas[2])


def test_gammas_summing_to_exactly_one_are_allowed():
    """Fails if the sum-to-one bound is strict, or loses its tolerance for 0.1 + 0.2 + 0.7 in floats."""
    w = importance_weights(torch.tensor([[0, 1, 2]]), torch.full((1, 3), 1 / 3), torch.zeros(1, 3),
                           gamma_position=0.1, gamma_confidence=0.2, gamma_agreement=0.7)
    assert w.shape == (1, 3)


def test_listnet_by_hand_with_weights():
    """Fails if ListNet is not -sum_i w_i q_i log softmax(s)_i averaged over the batch."""
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    q = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 1.0]])
    log_p = np.log(_softmax(s.numpy()))
    expected = -(q.numpy() * w.numpy() * log_p).sum(axis=1).mean()
    assert float(listnet_loss(s, q, w)) == pytest.approx(expected, rel=1e-6)
    assert float(listnet_loss(s, q)) == pytest.approx(-(q.numpy() * log_p).sum(axis=1).mean(), rel=1e-6)


def test_embedding_losses_by_hand():
    """Fails if the standardized loss is not the mean squared difference of batch z-scores (population
    std plus eps), the cosine loss does not use eps for zero vectors, or a wrong kind is accepted."""
    p = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 1.0]])
    u = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    eps = 1e-5

    def z(x):
        return (x - x.mean(axis=0)) / (x.std(axis=0) + eps)

    expected = ((z(p.numpy()) - z(u.numpy())) ** 2).mean()
    assert float(embedding_loss(p, u, "standardized")) == pytest.approx(expected, rel=1e-5)
    assert float(embedding_loss(torch.zeros(2, 2), torch.ones(2, 2), "cosine")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"^the standardized embedding loss needs at least 2 samples per batch$"):
        embedding_loss(p[:1], u[:1], "standardized")
    assert float(embedding_loss(p[:2], u[:2], "standardized")) >= 0
    with pytest.raises(ValueError, match=r"^unknown embedding loss 'l1'$"):
        embedding_loss(p, u, "l1")


def test_weights_live_on_the_inputs_device():
    """Fails if the weights are made on the default device instead of the inputs' (a CUDA run would then
    mix devices); checked on PyTorch's shape-only 'meta' device."""
    ranks = torch.empty((2, 4), dtype=torch.long, device="meta")
    probs = torch.empty((2, 4), device="meta")
    student = torch.empty((2, 4), device="meta")
    assert importance_weights(ranks, probs, student).device.type == "meta"
    assert importance_weights(ranks, probs, student, gamma_position=0.5).device.type == "meta"


def test_cosine_loss_damps_vectors_shorter_than_eps():
    """Fails if the cosine loss stops using its eps (1e-5): a projection of norm 1e-6 (a collapse) must
    not count as perfectly aligned."""
    p, u = torch.tensor([[1e-6, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert float(embedding_loss(p, u, "cosine")) == pytest.approx(0.9, rel=1e-4)
    assert float(embedding_loss(p, u, "cosine", eps=1e-8)) == pytest.approx(0.0, abs=1e-6)


def test_ranks_keep_the_rankings_integer_type_and_device():
    """Fails if the positions are made as int64 or on the default device: an int32 ranking (scatter
    accepts int32 and int64 indices) must give int32 ranks, and scatter needs the source to match the
    ranking's dtype and device."""
    ranking = torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32)
    ranks = ranks_from_ranking(ranking)
    assert ranks.dtype == torch.int32 and ranks.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert ranks_from_ranking(torch.empty((2, 3), dtype=torch.long, device="meta")).device.type == "meta"
