import math

import numpy as np
import pytest
import torch

from pipeline.metrics import mask_seen, per_user, summarize, target_ranks


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
