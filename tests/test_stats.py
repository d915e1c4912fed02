import numpy as np
import pytest

from pipeline.evaluation.stats import paired_bootstrap


def test_identical_models_are_not_different():
    a = np.random.default_rng(0).random(500)
    r = paired_bootstrap(a, a.copy(), n_boot=500, seed=1)
    assert r.diff == 0.0 and r.ci_low == 0.0 and r.ci_high == 0.0
    assert not r.significant
    assert r.verdict() == "no significant difference between distilled and baseline"


def test_clear_improvement_is_significant_and_ci_brackets_the_mean():
    rng = np.random.default_rng(0)
    a = rng.random(1000)
    b = a + 0.05 + rng.normal(0, 0.05, size=1000)
    r = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert r.significant and r.ci_low > 0
    assert r.ci_low < r.diff < r.ci_high
    assert abs(r.diff - 0.05) < 0.01
    assert r.p_value < 0.01
    assert r.verdict() == "distilled is significantly better than baseline"
    worse = paired_bootstrap(b, a, n_boot=1000, seed=0)
    assert worse.significant and worse.ci_high < 0
    assert worse.verdict() == "baseline is significantly better than distilled"


def test_pairing_removes_shared_user_variance():
    # users differ a lot, models differ by a small constant: only a paired test sees it
    rng = np.random.default_rng(3)
    user = rng.normal(0, 1.0, size=400)
    a, b = user, user + 0.01
    assert paired_bootstrap(a, b, n_boot=300, seed=0).significant


def test_pure_noise_is_usually_not_significant():
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(40):
        a = rng.binomial(1, 0.3, size=300).astype(float)
        b = rng.binomial(1, 0.3, size=300).astype(float)
        hits += paired_bootstrap(a, b, n_boot=400, seed=trial).significant
    assert hits <= 6  # about 5% expected at 95% confidence


def test_deterministic_for_a_seed_and_seed_matters():
    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200)
    r1 = paired_bootstrap(a, b, n_boot=300, seed=5)
    r2 = paired_bootstrap(a, b, n_boot=300, seed=5, chunk=7)
    r3 = paired_bootstrap(a, b, n_boot=300, seed=6)
    assert r1 == r2
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)


def test_bad_inputs():
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no users"):
        paired_bootstrap(np.zeros(0), np.zeros(0))


def test_bootstrap_matches_the_exact_distribution_by_enumeration():
    """d = b - a = (0, 0, 3). A resample of 3 users holds k copies of the 3, k ~ Binomial(3, 1/3), so
    its mean is k with P = 8/27, 12/27, 6/27, 1/27 (worked out by hand). Then the 95% CI is [0, 3]
    (P(0) = 0.296 > 0.025; P(k <= 2) = 26/27 = 0.963 < 0.975) and the two-sided p-value is
    2 * min(P(mean <= 0), P(mean >= 0)) = 16/27. Fails if the CI, the p-value or the pairing is wrong."""
    a = np.array([1.0, 2.0, 0.0])
    b = np.array([1.0, 2.0, 3.0])
    r = paired_bootstrap(a, b, n_boot=40000, seed=0)
    assert r.diff == 1.0 and r.mean_a == 1.0 and r.mean_b == 2.0
    assert (r.ci_low, r.ci_high) == (0.0, 3.0)
    assert abs(r.p_value - 16 / 27) < 0.015
    assert not r.significant and r.n_users == 3 and r.n_boot == 40000


def test_bootstrap_ci_matches_the_normal_approximation():
    """For n = 2000 users the bootstrap mean is close to normal: CI = mean +- 1.96 sd / sqrt(n), with
    sd the population sd of d (closed form, not the function under test). Fails if the CI is
    computed at another confidence, on unpaired data, or with the wrong spread."""
    rng = np.random.default_rng(11)
    a = rng.random(2000)
    d = rng.normal(0.02, 0.3, size=2000)
    r = paired_bootstrap(a, a + d, n_boot=4000, seed=3)
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert abs(r.ci_low - (d.mean() - half)) < 0.12 * half
    assert abs(r.ci_high - (d.mean() + half)) < 0.12 * half
    r90 = paired_bootstrap(a, a + d, n_boot=4000, seed=3, confidence=0.9)
    assert abs((r90.ci_high - r90.ci_low) / 2 - 1.645 * d.std() / np.sqrt(len(d))) < 0.12 * half
