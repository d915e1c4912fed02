"""Ranking metrics from 0-based ranks of the target (0 = ranked first). Pure numpy, per user."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_METRICS = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10")


class NonFiniteScores(ValueError):
    """A model produced NaN or +inf scores, or a non-finite score for a target: it has diverged."""


def check_scores(scores: Tensor, targets: Tensor) -> None:
    """Refuse scores that cannot be ranked honestly.

    -inf is the masking value (the padding column, seen items): it is allowed anywhere except at
    the target. NaN (every comparison with it is false, so a NaN target would rank first) and +inf
    are never allowed.
    """
    t = scores.gather(1, targets[:, None])[:, 0]
    bad = torch.isnan(scores).any(dim=1) | torch.isposinf(scores).any(dim=1) | ~torch.isfinite(t)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise NonFiniteScores(
            f"non-finite scores for {int(bad.sum())} of {len(bad)} users (first: row {row}, target score "
            f"{float(t[row])}): the model has diverged; lower the learning rate"
        )


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """scores [B, N], targets [B] -> 0-based rank of each target, ties ranked pessimistically.

    rank = the number of *other* items scoring at least as high as the target, so a tie never
    favours the target: constant scores put it last (rank N-1), not first. This is the pessimistic
    convention (the target comes after every item it ties with); it keeps ranks integral.
    Masked items (-inf) rank below any finite target. Raises NonFiniteScores on NaN or +inf
    scores, or a target whose own score is not finite (see check_scores).
    """
    check_scores(scores, targets)
    t = scores.gather(1, targets[:, None])
    return (scores >= t).sum(1) - 1


def per_user(ranks: np.ndarray, name: str) -> np.ndarray:
    """One metric per user, e.g. name='ndcg@10'."""
    kind, k = name.split("@")
    k = int(k)
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < k
    if kind == "hr":
        return hit.astype(np.float64)
    if kind == "ndcg":
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    if kind == "mrr":
        return np.where(hit, 1.0 / (ranks + 1.0), 0.0)
    raise ValueError(f"unknown metric {name!r}; use hr@k, ndcg@k or mrr@k")


def summarize(ranks: np.ndarray, names: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, float]:
    return {n: float(per_user(ranks, n).mean()) for n in names}


def mask_seen(scores: Tensor, histories: Tensor) -> Tensor:
    """Set the scores of items in each user's history (padding 0 included) to -inf, in place."""
    return scores.scatter_(1, histories, float("-inf"))


def masked_target_ranks(scores: Tensor, targets: Tensor, histories: Tensor) -> Tensor:
    """Ranks with every item of each user's history masked (in place on `scores`).

    A target that is itself in the history (a repeat consumption) cannot be recommended once seen
    items are masked: it counts as a miss at every cutoff (rank N-1, the last), as in RecBole's
    full-sort evaluation, instead of being ranked among the -inf items.
    """
    check_scores(scores, targets)  # the unmasked scores must be finite first
    seen = (histories == targets[:, None]).any(dim=1)
    raw = scores.gather(1, targets[:, None])
    mask_seen(scores, histories)
    scores.scatter_(1, targets[:, None], raw)  # rank it as usual, then overrule below
    ranks = target_ranks(scores, targets)
    ranks[seen] = scores.shape[1] - 1
    return ranks


__all__ = ["DEFAULT_METRICS", "NonFiniteScores", "check_scores", "target_ranks", "per_user", "summarize",
           "mask_seen", "masked_target_ranks"]
