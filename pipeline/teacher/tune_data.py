"""teacher-tune's samples: training prefixes, the retriever's candidates with the target forced in, shuffled.

Pure numpy: no LLM imports. A sample (user u, position p) shows the history `train[u][:p]` and asks
for `train[u][p]`, so a validation or test item is never a target and never in a history (the split
keeps them out of `train`). Candidates are the retriever's top-K unseen items for that prefix; when
the target is missing it replaces the lowest-scored candidate (LlamaRec's recipe). The order shown
to the teacher is a per-sample seeded shuffle, so the target's position is uniform over 0..K-1 and a
tuned teacher cannot learn a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TuneSamples:
    user_idx: np.ndarray  # [N] int32
    position: np.ndarray  # [N] int32: history = train[u][:position], target = train[u][position]
    target: np.ndarray  # [N] int32 item ids
    shown: np.ndarray  # [N, K] int32 candidate item ids in the order shown to the teacher
    target_index: np.ndarray  # [N] int64: where the target sits in `shown`
    forced: np.ndarray  # [N] bool: the retriever missed the target and it replaced the last candidate

    def __len__(self) -> int:
        return len(self.user_idx)


def split_users(n_users: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tune users, held-out users): a seeded split, so the teacher is evaluated on users it never saw."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    perm = np.random.default_rng([seed, 0x7E57]).permutation(n_users)
    n_hold = int(round(holdout_fraction * n_users))
    return np.sort(perm[n_hold:]).astype(np.int32), np.sort(perm[:n_hold]).astype(np.int32)


def training_prefixes(train: list[np.ndarray], users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (user, position) with position in 1..len(train[u])-1, for the given users, in user order."""
    us, ps = [], []
    for u in users:
        n = len(train[u])
        if n >= 2:
            us.append(np.full(n - 1, u, dtype=np.int32))
            ps.append(np.arange(1, n, dtype=np.int32))
    if not us:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(us), np.concatenate(ps)


def force_target(cands: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cands [N, K] best first; put each target in, replacing the last (lowest) candidate when absent."""
    out = np.array(cands, dtype=np.int32, copy=True)
    present = (out == target[:, None]).any(1)
    out[~present, -1] = target[~present]
    return out, ~present


def shuffle_candidates(cands: np.ndarray, target: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row seeded permutation (seed, row) of the candidates; returns (shown, index of the target)."""
    n, k = cands.shape
    shown = np.empty_like(cands)
    for i in range(n):
        shown[i] = cands[i, np.random.default_rng([seed, i]).permutation(k)]
    where = shown == target[:, None]
    if not where.any(1).all():
        raise ValueError("a target is missing from its candidates; call force_target first")
    return shown, where.argmax(1).astype(np.int64)


def build_samples(train: list[np.ndarray], users: np.ndarray, positions: np.ndarray, cands: np.ndarray,
                  seed: int) -> TuneSamples:
    """Assemble the samples from retrieved candidates (rows aligned with users/positions)."""
    target = np.array([train[u][p] for u, p in zip(users, positions)], dtype=np.int32)
    forced_cands, forced = force_target(cands, target)
    shown, tix = shuffle_candidates(forced_cands, target, seed)
    return TuneSamples(users.astype(np.int32), positions.astype(np.int32), target, shown, tix, forced)


def position_uniformity_pvalue(target_index: np.ndarray, k: int) -> float:
    """Chi-square goodness-of-fit p-value of the target positions against uniform over 0..k-1."""
    from math import exp, lgamma, log

    counts = np.bincount(target_index, minlength=k).astype(np.float64)
    expected = counts.sum() / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = k - 1
    # Survival function of chi-square with `dof` degrees of freedom: regularized upper gamma Q(dof/2, chi2/2).
    a, x = dof / 2.0, chi2 / 2.0
    if x == 0:
        return 1.0
    if x < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(1000):
            n += 1
            term *= x / n
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1.0 - total * exp(-x + a * log(x) - lgamma(a)))
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)  # continued fraction for Q
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return float(exp(-x + a * log(x) - lgamma(a)) * h)
