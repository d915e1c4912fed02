"""The paired bootstrap, checked where mutation testing found test_stats.py blind (docs/MUTATION.md)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.stats import PairedDiff, paired_bootstrap


def _reference(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, confidence: float):
    """The bootstrap written out in one draw: users resampled with replacement, percentile CI."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return low, high, min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean()))


def test_ci_and_p_value_match_the_bootstrap_written_out():
    """Fails if a bootstrap replicate is skipped or left unset, a user is never drawn (integers(1, n)),
    the tail is not (1 - confidence) / 2 on each side, or the p-value's factor 2 changes."""
    rng = np.random.default_rng(11)
    a = rng.random(57)
    b = a + rng.normal(0.01, 0.2, size=57)
    for confidence in (0.95, 0.8):
        r = paired_bootstrap(a, b, n_boot=450, seed=4, confidence=confidence, chunk=100)
        low, high, p = _reference(a, b, 450, 4, confidence)
        assert (r.ci_low, r.ci_high) == pytest.approx((low, high), abs=1e-12)
        assert r.p_value == pytest.approx(p, abs=1e-12)
        assert 0.05 < r.p_value < 1  # not a degenerate case where any factor gives the same answer


def test_defaults_are_2000_replicates_seed_0():
    """Fails if the default number of replicates or the default seed changes: evaluate relies on both
    for results that reproduce across runs."""
    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    r = paired_bootstrap(a, b)
    assert r.n_boot == 2000
    assert r == paired_bootstrap(a, b, n_boot=2000, seed=0, confidence=0.95)


def test_every_field_of_the_result():
    """Fails if mean_a, mean_b, n_users or n_boot are not filled in from the data."""
    a = np.array([0.0, 1.0, 0.5, 0.5])
    b = np.array([1.0, 1.0, 0.0, 1.0])
    r = paired_bootstrap(a, b, n_boot=64, seed=0)
    assert (r.mean_a, r.mean_b, r.diff) == (0.5, 0.75, 0.25)
    assert (r.n_users, r.n_boot) == (4, 64)
    assert PairedDiff(**r.to_dict()) == r
    assert set(r.to_dict()) == {"mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value", "n_users",
                                "n_boot", "significant"}


def test_p_value_counts_bootstrap_means_of_exactly_zero_on_both_sides():
    """Fails if either tail uses a strict comparison (or the wrong threshold): with d = (0, 0, -1) a
    bootstrap mean is exactly 0 whenever the third user is not drawn, probability (2/3)^3."""
    expected = 2 * (2 / 3) ** 3  # about 0.593
    for a, b in (([0, 0, 0], [0, 0, -1.0]), ([0, 0, -1.0], [0, 0, 0])):
        r = paired_bootstrap(np.array(a, dtype=float), np.array(b, dtype=float), n_boot=4000, seed=0)
        assert abs(r.p_value - expected) < 0.05


def test_identical_models_have_p_value_one():
    """Fails if the p-value is not capped at 1: when every bootstrap mean is 0 both tails hold all of it."""
    a = np.random.default_rng(0).random(30)
    assert paired_bootstrap(a, a.copy(), n_boot=100).p_value == 1.0


def test_boolean_hits_and_low_precision_inputs_are_averaged_in_float64():
    """Fails if the inputs are not converted to float64: per-user hits come as booleans (bool - bool is
    an error in numpy), and float16 scores would be averaged at float16 precision."""
    hits_a = np.array([True, False, False, True])
    hits_b = np.array([True, True, False, True])
    r = paired_bootstrap(hits_a, hits_b, n_boot=50)
    assert (r.mean_a, r.mean_b, r.diff) == (0.5, 0.75, 0.25)
    low = np.array([0.0, 1.0, 1.0], dtype=np.float16)
    r = paired_bootstrap(low, low[::-1].copy(), n_boot=50)
    assert r.mean_a == pytest.approx(2 / 3, rel=1e-12) and r.mean_b == pytest.approx(2 / 3, rel=1e-12)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_the_open_unit_interval_is_refused(confidence):
    """Fails if 0 or 1 (or more) is accepted as a confidence level, or the message loses the bound."""
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        paired_bootstrap(np.zeros(3), np.ones(3), confidence=confidence)


def test_error_messages_say_what_is_wrong():
    """Fails if the messages stop naming the problem (they reach the user through evaluate)."""
    with pytest.raises(ValueError, match=r"^no users to compare$"):
        paired_bootstrap(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match=r"^paired arrays must be 1-D and aligned, got \(3,\) and \(4,\)$"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap(np.zeros((2, 2)), np.zeros((2, 2)))
