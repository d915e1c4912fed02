import numpy as np
import pytest

from pipeline.stats import paired_bootstrap


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
