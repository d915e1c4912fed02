"""Ranking quality of several scorers on the same candidate sets (the target is present in each).

Pure numpy. Ties rank pessimistically: a candidate scoring the same as the target counts as ahead of
it, so a constant scorer (or one that returns NaN) cannot look good.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.stats import paired_bootstrap


def pessimistic_rank(scores: np.ndarray, label: np.ndarray) -> np.ndarray:
    """0-based rank of the target among its K candidates; ties and non-finite scores count against it."""
    scores = np.asarray(scores, dtype=np.float64)
    own = scores[np.arange(len(label)), label]
    others = np.ones_like(scores, dtype=bool)
    others[np.arange(len(label)), label] = False
    ahead = (scores >= own[:, None]) | ~np.isfinite(own)[:, None]
    return (ahead & others).sum(axis=1)


def per_set_metrics(rank: np.ndarray, k: int) -> dict[str, np.ndarray]:
    return {f"ndcg@{k}": 1.0 / np.log2(rank + 2.0), "hr@1": (rank < 1).astype(float), "hr@5": (rank < 5).astype(float)}


def evaluate_sets(scores: dict[str, np.ndarray], labels: np.ndarray, k: int, n_boot: int = 2000,
                  seed: int = 0, reference: str = "tuned") -> dict:
    """Mean metrics per scorer, top-1 position histograms, and paired bootstrap CIs of `reference` minus each other."""
    out: dict = {"n_sets": int(len(labels)), "metrics": {}, "top1_position": {}, "vs_" + reference: {}}
    if len(labels) == 0:
        return out
    per = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        per[name] = per_set_metrics(pessimistic_rank(s, labels), k)
        out["metrics"][name] = {m: float(v.mean()) for m, v in per[name].items()}
        top1 = np.where(np.isfinite(s).all(1), s.argmax(1), -1)
        out["top1_position"][name] = np.bincount(top1[top1 >= 0], minlength=k).tolist()
    if reference in per:
        for name in per:
            if name == reference:
                continue
            out["vs_" + reference][name] = {
                m: paired_bootstrap(per[name][m], per[reference][m], n_boot=n_boot, seed=seed).to_dict()
                for m in per[reference]}
    return out
