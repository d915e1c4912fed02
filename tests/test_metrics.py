import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import mask_seen, per_user, summarize, target_ranks


def test_ranks_and_metrics_by_hand():
    scores = torch.tensor([[float("-inf"), 0.1, 0.9, 0.5, 0.3],
                           [float("-inf"), 0.9, 0.8, 0.7, 0.6]])
    ranks = target_ranks(scores, torch.tensor([3, 4])).numpy()
    assert ranks.tolist() == [1, 3]
    m = summarize(ranks, ("hr@1", "hr@2", "ndcg@2", "ndcg@10", "mrr@10"))
    assert m["hr@1"] == 0.0 and m["hr@2"] == 0.5
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert per_user(np.array([0, 10, 9]), "hr@10").tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        per_user(ranks, "map@10")


def test_masking_seen_items_moves_target_up():
    scores = torch.tensor([[float("-inf"), 0.9, 0.8, 0.7, 0.1]])
    hist = torch.tensor([[0, 1, 2]])  # padded history: items 1 and 2 already seen
    assert target_ranks(scores.clone(), torch.tensor([3])).item() == 2
    masked = mask_seen(scores.clone(), hist)
    assert torch.isinf(masked[0, [0, 1, 2]]).all() and masked[0, 3] == pytest.approx(0.7)
    assert target_ranks(masked, torch.tensor([3])).item() == 0


# ---------------------------------------------------------------- ties, constant scores, non-finite scores

from pipeline.evaluation.metrics import NonFiniteScores, masked_target_ranks  # noqa: E402

NEG = float("-inf")


def test_ties_never_favour_the_target():
    """Fails if ties count in the target's favour (strict `>`): the target must come after every item it ties with."""
    scores = torch.tensor([[NEG, 0.5, 0.5, 0.5, 0.1],
                           [NEG, 0.9, 0.5, 0.5, 0.1]])
    # row 0: items 1 and 3 tie with target 2 -> two items at least as high -> rank 2 (pessimistic)
    # row 1: item 1 beats it, item 2 ties with target 3 -> rank 2
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [2, 2]


def test_constant_scores_rank_the_target_last():
    """Fails if a constant-score model (no information) gets HR@1 = 1: its target must rank last of the real items."""
    scores = torch.zeros(3, 6)
    scores[:, 0] = NEG  # padding column
    ranks = target_ranks(scores, torch.tensor([1, 3, 5])).numpy()
    assert ranks.tolist() == [4, 4, 4]  # 5 real items: 4 others tie with each target
    m = summarize(ranks, ("hr@1", "hr@4", "hr@5", "ndcg@10"))
    assert m["hr@1"] == 0.0 and m["hr@4"] == 0.0 and m["hr@5"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(6))


@pytest.mark.parametrize("where, value", [("target", float("nan")), ("other", float("nan")),
                                          ("target", float("inf")), ("other", float("inf")),
                                          ("target", NEG)])
def test_non_finite_scores_are_refused(where, value):
    """Fails if a NaN target ranks first (every comparison with NaN is false), or +inf / a -inf target pass silently."""
    scores = torch.tensor([[NEG, 0.3, 0.2, 0.1]])
    scores[0, 2 if where == "target" else 1] = value
    with pytest.raises(NonFiniteScores, match="non-finite scores for 1 of 1 users"):
        target_ranks(scores, torch.tensor([2]))


def test_masked_items_are_allowed_and_rank_below_the_target():
    """Fails if -inf (the masking value) on a non-target item is refused, or outranks a finite target."""
    scores = torch.tensor([[NEG, NEG, NEG, -5.0, NEG]])
    assert target_ranks(scores, torch.tensor([3])).item() == 0


def test_a_nan_model_cannot_score_perfectly():
    """Fails if an all-NaN model (a diverged one) is given HR = NDCG = 1 instead of an error."""
    scores = torch.full((4, 10), float("nan"))
    with pytest.raises(NonFiniteScores):
        target_ranks(scores, torch.tensor([1, 2, 3, 4]))


def test_a_target_in_the_history_is_a_miss_when_seen_items_are_masked():
    """Fails if a repeated (seen) target, masked to -inf, is ranked among the other -inf items (a hit@k in a
    small catalogue) or refused: masked evaluation counts it as a miss at every cutoff (rank N-1)."""
    scores = torch.tensor([[NEG, 0.9, 0.8, 0.7, 0.1],
                           [NEG, 0.9, 0.8, 0.7, 0.1]])
    hist = torch.tensor([[0, 1, 3],   # target 3 was seen: a miss
                         [0, 1, 2]])  # target 4 not seen: items 1, 2 masked, item 3 beats it
    ranks = masked_target_ranks(scores.clone(), torch.tensor([3, 4]), hist)
    assert ranks.tolist() == [4, 1]
    with pytest.raises(NonFiniteScores):
        bad = scores.clone()
        bad[1, 4] = float("nan")
        masked_target_ranks(bad, torch.tensor([3, 4]), hist)
