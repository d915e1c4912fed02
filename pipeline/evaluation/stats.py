"""Paired bootstrap over users for the difference of two models' per-user metrics. Pure numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDiff:
    """mean(b) - mean(a) over the same users, with a percentile bootstrap CI."""

    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided bootstrap p-value for diff == 0
    n_users: int
    n_boot: int
    significant: bool  # the CI excludes 0

    def verdict(self, name_a: str = "baseline", name_b: str = "distilled") -> str:
        if not self.significant:
            return f"no significant difference between {name_b} and {name_a}"
        better, worse = (name_b, name_a) if self.diff > 0 else (name_a, name_b)
        return f"{better} is significantly better than {worse}"

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 200,
) -> PairedDiff:
    """Resample users with replacement; the same resampled users score both models.

    a, b: per-user metric values (e.g. NDCG@10 of each test user), aligned by user.
    Deterministic for a given seed. Memory is bounded by chunk x n_users.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired arrays must be 1-D and aligned, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("no users to compare")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = b - a
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        boots[start : start + m] = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boots, [tail, 1.0 - tail])
    # two-sided: how often the bootstrap distribution falls on the other side of 0
    p = 2.0 * min((boots <= 0).mean(), (boots >= 0).mean())
    return PairedDiff(
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=float(d.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=float(min(1.0, p)),
        n_users=int(n),
        n_boot=int(n_boot),
        significant=bool(low > 0 or high < 0),
    )
