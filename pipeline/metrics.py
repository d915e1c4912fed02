"""Ranking metrics from 0-based ranks of the target (0 = ranked first). Pure numpy, per user."""

from __future__ import annotations

import numpy as np
from torch import Tensor

DEFAULT_METRICS = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10")


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """scores [B, N], targets [B] -> rank of each target: how many items score strictly higher.

    Ties count in the target's favour only for exactly equal floats, which real models almost never
    produce; masked items (-inf) never outrank a finite target.
    """
    t = scores.gather(1, targets[:, None])
    return (scores > t).sum(1)


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


__all__ = ["DEFAULT_METRICS", "target_ranks", "per_user", "summarize", "mask_seen"]
