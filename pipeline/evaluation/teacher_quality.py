"""How good is the teacher on its own candidate sets, next to the students' ranking of the same sets?

Pure numpy: feed batches (candidates, ranking, target, status, optional student scores), read a dict.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.teacher.parse import DECISION_STATUSES


def ranks_of_target(candidates: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, K], [B] -> (present [B] bool, index [B] of the target in candidates, -1 where absent)."""
    hit = candidates == target[:, None]
    present = hit.any(axis=1)
    return present, np.where(present, hit.argmax(axis=1), -1)


def rank_from_scores(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """0-based rank of candidate `index` per row, ties ranked pessimistically (as pipeline.evaluation.metrics):
    the number of *other* candidates scoring at least as high, so constant scores put it last.
    Non-finite scores are refused: a NaN would otherwise rank first."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("non-finite candidate scores: the model that produced them has diverged")
    own = scores[np.arange(len(index)), index]
    return (scores >= own[:, None]).sum(axis=1) - 1


def rank_from_ranking(ranking: np.ndarray, index: np.ndarray) -> np.ndarray:
    """0-based rank of candidate `index` per row, from a best-first permutation of candidate indices."""
    return (ranking == index[:, None]).argmax(axis=1)


def ndcg_single(rank: np.ndarray) -> np.ndarray:
    """NDCG@K with one relevant item at 0-based rank r (within the K): 1 / log2(r + 2)."""
    return 1.0 / np.log2(rank + 2.0)


class TeacherQuality:
    """Accumulates teacher (and student) quality over a stream of store batches."""

    def __init__(self, k: int, students: tuple[str, ...] = ()):
        self.k, self.students = k, students
        self.n = self.n_present = self.n_failed = self.n_repaired = 0
        self.status_counts: Counter[str] = Counter()
        self.top1 = np.zeros(k, dtype=np.int64)  # teacher's first choice, by position shown
        self.rank_counts = {name: np.zeros(k, dtype=np.int64) for name in ("teacher", *students)}

    def update(self, candidates: np.ndarray, ranking: np.ndarray, target: np.ndarray, status: np.ndarray,
               student_scores: dict[str, np.ndarray] | None = None) -> None:
        # The teacher's ranking counts where it is its decision: not a failed parse (shown order), not a
        # generation whose first token was no identifier (generate mode's no_decision).
        ok = np.isin(status, DECISION_STATUSES)
        self.n += len(target)
        self.status_counts.update(str(s) for s in status)
        self.n_failed += int((status == "failed").sum())
        self.n_repaired += int((status == "repaired").sum())
        self.top1 += np.bincount(ranking[ok, 0], minlength=self.k)[: self.k]
        present, index = ranks_of_target(candidates, target)
        self.n_present += int(present.sum())
        sel = present & ok
        self.rank_counts["teacher"] += np.bincount(rank_from_ranking(ranking[sel], index[sel]), minlength=self.k)
        for name, scores in (student_scores or {}).items():
            r = rank_from_scores(scores[sel], index[sel])
            self.rank_counts[name] += np.bincount(r, minlength=self.k)

    def result(self) -> dict:
        k = self.k
        weights = ndcg_single(np.arange(k))
        out: dict = {
            "samples": self.n,
            "k": k,
            "target_in_candidates": self.n_present / max(1, self.n),
            "parse_failure_rate": self.n_failed / max(1, self.n),
            "repaired_rate": self.n_repaired / max(1, self.n),
            # generate mode: first generated token not an identifier (h_dec is no decision state) ...
            "no_decision_rate": self.status_counts["no_decision"] / max(1, self.n),
            # ... and answers stopped by the decode budget (the truncation rate)
            "cut_rate": self.status_counts["cut"] / max(1, self.n),
            "status_counts": dict(self.status_counts),
            "random_ndcg@k": float(weights.mean()),  # what a random order scores where the target is present
            "top1_position_share": (self.top1 / max(1, self.top1.sum())).round(4).tolist(),
            "top1_position_counts": self.top1.tolist(),
            "top1_most_common_share": float(self.top1.max() / max(1, self.top1.sum())),
        }
        for name, counts in self.rank_counts.items():
            m = max(1, int(counts.sum()))
            out[name] = {
                "ndcg@k_where_present": float((counts * weights).sum() / m),
                "hr@1_where_present": float(counts[0] / m),
                "mean_rank_where_present": float((counts * np.arange(k)).sum() / m),
                "samples_scored": int(counts.sum()),
                "rank_share": (counts / m).round(4).tolist(),
            }
        return out
