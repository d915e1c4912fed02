"""Ranking metrics as properties (hypothesis) against their definitions, with the pessimistic tie rule,
plus the cases mutation testing found untested (docs/MUTATION.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.evaluation.metrics import (DEFAULT_METRICS, NonFiniteScores, check_scores, mask_seen, masked_target_ranks,
                              per_user, summarize, target_ranks)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEG = float("-inf")

# Few distinct values, so that ties are common.
_score = st.sampled_from([NEG, -1.0, 0.0, 0.25, 0.5, 1.0, 2.0])


@st.composite
def _rows(draw):
    n_items = draw(st.integers(2, 8))
    batch = draw(st.integers(1, 4))
    scores = [[draw(_score) for _ in range(n_items)] for _ in range(batch)]
    targets = [draw(st.integers(0, n_items - 1)) for _ in range(batch)]
    for row, t in zip(scores, targets):  # the target's own score must be finite
        if row[t] == NEG:
            row[t] = draw(st.sampled_from([-1.0, 0.0, 0.5, 2.0]))
    return scores, targets


def _pessimistic_rank(row: list[float], t: int) -> int:
    """The definition: how many other items score at least as high as the target."""
    return sum(1 for j, s in enumerate(row) if j != t and s >= row[t])


@PROPERTY
@given(_rows())
def test_rank_is_the_count_of_other_items_at_least_as_high(case):
    """Fails if ties favour the target, masked (-inf) items outrank a finite target, or the rank is
    off by one. Expected value from the definition, item by item."""
    scores, targets = case
    ranks = target_ranks(torch.tensor(scores), torch.tensor(targets)).tolist()
    assert ranks == [_pessimistic_rank(row, t) for row, t in zip(scores, targets)]


@PROPERTY
@given(_rows(), st.integers(0, 3), st.sampled_from([0.5, 1.0, 3.0]))
def test_raising_the_target_score_never_lowers_any_metric(case, which, bump):
    """Fails if a better target score can give a worse rank or a smaller metric: metrics must be
    monotone in the target's rank (hypothesis over ties and masked items)."""
    scores, targets = case
    which = which % len(targets)
    before = target_ranks(torch.tensor(scores), torch.tensor(targets)).numpy()
    raised = [list(r) for r in scores]
    raised[which][targets[which]] += bump
    after = target_ranks(torch.tensor(raised), torch.tensor(targets)).numpy()
    assert after[which] <= before[which]
    for name in ("hr@1", "hr@3", "ndcg@2", "ndcg@10", "mrr@3"):
        assert per_user(after, name)[which] >= per_user(before, name)[which]


@PROPERTY
@given(st.lists(st.integers(0, 30), min_size=1, max_size=20), st.integers(1, 25))
def test_per_user_metrics_follow_their_formulas(ranks, k):
    """Fails if hit@k, NDCG@k or MRR@k differ from their definitions at any rank, including the cutoff
    (rank k-1 is a hit, rank k a miss). Expected values computed here with math, not with per_user."""
    r = np.array(ranks)
    assert per_user(r, f"hr@{k}").tolist() == [1.0 if x < k else 0.0 for x in ranks]
    np.testing.assert_allclose(per_user(r, f"ndcg@{k}"), [1 / math.log2(x + 2) if x < k else 0.0 for x in ranks])
    np.testing.assert_allclose(per_user(r, f"mrr@{k}"), [1 / (x + 1) if x < k else 0.0 for x in ranks])
    assert per_user(r, f"hr@{k}").dtype == np.float64


def test_metrics_of_integer_ranks_are_exact_floats():
    """Fails if integer ranks are not converted to float before 1/log2 and 1/(r+1) (integer division
    or overflow on int32 ranks)."""
    r = np.array([0, 1, 3], dtype=np.int32)
    assert per_user(r, "mrr@10").tolist() == [1.0, 0.5, 0.25]
    assert per_user(r, "ndcg@10").tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(5)])


def test_summarize_means_each_default_metric():
    """Fails if summarize drops or renames a default metric or does not average over users."""
    ranks = np.array([0, 4, 15, 40])
    m = summarize(ranks)
    assert tuple(m) == DEFAULT_METRICS == ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10")
    assert m["hr@10"] == 0.5 and m["hr@20"] == 0.75
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(17)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 5) / 4)
    assert all(isinstance(v, float) for v in m.values())


def test_unknown_metric_name_is_refused_with_the_choices():
    """Fails if an unknown metric silently returns something, or the message stops listing the kinds."""
    with pytest.raises(ValueError, match=r"^unknown metric 'map@10'; use hr@k, ndcg@k or mrr@k$"):
        per_user(np.array([0]), "map@10")


def test_non_finite_message_counts_users_and_names_the_first():
    """Fails if the message miscounts the bad users or names the wrong first row or target score."""
    scores = torch.tensor([[NEG, 0.1, 0.2], [NEG, float("nan"), 0.2], [NEG, 0.1, NEG], [NEG, 0.3, 0.1]])
    with pytest.raises(NonFiniteScores) as e:
        check_scores(scores, torch.tensor([1, 2, 2, 1]))
    assert str(e.value) == ("non-finite scores for 2 of 4 users (first: row 1, target score 0.20000000298023224): "
                            "the model has diverged; lower the learning rate")
    assert isinstance(e.value, ValueError)
    check_scores(torch.tensor([[NEG, 0.1, NEG]]), torch.tensor([1]))  # -inf off the target is masking


def test_mask_seen_masks_in_place_and_returns_the_tensor():
    """Fails if mask_seen works on a copy (callers rely on the in-place write) or masks other items."""
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7], [0.0, 0.1, 0.2, 0.3]])
    out = mask_seen(scores, torch.tensor([[0, 2], [0, 0]]))
    assert out is scores
    assert scores.tolist() == [[NEG, pytest.approx(0.9), NEG, pytest.approx(0.7)],
                               [NEG, pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]]


def test_masked_ranks_mask_the_whole_history_and_keep_the_target_score():
    """Fails if masking skips part of a long history, if the target's own score is lost to the mask,
    or if a seen target is not ranked last (N - 1)."""
    n = 12
    scores = torch.linspace(1.0, 0.0, n + 1)[None].repeat(2, 1)  # item 1 best ... item 12 worst
    scores[:, 0] = NEG  # the padding column, as the model scores it
    history = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]])
    ranks = masked_target_ranks(scores, torch.tensor([11, 11]), history)
    # row 0: 1..10 masked, only 12 remains and it scores lower -> rank 0; row 1: target seen -> last
    assert ranks.tolist() == [0, n]
    assert scores[0, 11].item() == pytest.approx(1 - 11 / 12)


def test_one_diverged_user_is_counted_once():
    """Fails if a +inf in one user's row is counted against every user (the check must be per row)."""
    scores = torch.tensor([[NEG, 0.1, 0.2], [NEG, float("inf"), 0.2], [NEG, 0.3, 0.1]])
    with pytest.raises(NonFiniteScores, match=r"^non-finite scores for 1 of 3 users \(first: row 1, "):
        check_scores(scores, torch.tensor([1, 2, 1]))
