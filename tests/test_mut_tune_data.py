"""teacher-tune's samples, pinned where tests/test_teacher_tune.py checks only properties (mutation testing,
docs/MUTATION.md): the seeded user split and shuffle as exact values (a tuned profile rerun must hold out the
same users and show the same orders), the int32 contracts, the argument checks, and the chi-square p-value
against an independent high-precision reference (mpmath, which torch installs) on both of its branches.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.teacher.tune_data import (build_samples, force_target, position_uniformity_pvalue, shuffle_candidates,
                                        split_users, training_prefixes)

mpmath = pytest.importorskip("mpmath")


# ---- the user split ------------------------------------------------------------------------------------------

def test_split_is_pinned_and_int32():
    tune, hold = split_users(12, 0.25, seed=0)
    assert tune.tolist() == [0, 2, 3, 4, 5, 7, 8, 9, 11] and hold.tolist() == [1, 6, 10]
    assert tune.dtype == np.int32 and hold.dtype == np.int32


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_split_accepts_fractions_in_zero_one(fraction):
    tune, hold = split_users(100, fraction, seed=1)
    assert len(hold) == round(fraction * 100) and len(tune) + len(hold) == 100
    assert sorted([*tune.tolist(), *hold.tolist()]) == list(range(100))


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_split_refuses_fractions_outside_zero_one(fraction):
    with pytest.raises(ValueError, match=rf"^holdout_fraction must be in \[0, 1\), got {fraction}$"):
        split_users(100, fraction, seed=1)


# ---- training prefixes ---------------------------------------------------------------------------------------

def test_prefixes_are_int32_with_or_without_rows():
    train = [np.array([5, 6, 7], np.int32), np.array([9], np.int32), np.array([1, 2], np.int32)]
    us, ps = training_prefixes(train, np.array([0, 1, 2]))
    assert us.tolist() == [0, 0, 2] and ps.tolist() == [1, 2, 1]
    assert us.dtype == np.int32 and ps.dtype == np.int32
    us, ps = training_prefixes(train, np.array([1]))  # a one-item user has no prefix
    assert us.shape == (0,) and ps.shape == (0,) and us.dtype == np.int32 and ps.dtype == np.int32


# ---- forcing and shuffling -----------------------------------------------------------------------------------

def test_force_target_returns_an_int32_copy():
    cands = np.array([[3, 4, 5], [6, 7, 8]], dtype=np.int64)
    out, forced = force_target(cands, np.array([4, 99]))
    assert out.dtype == np.int32 and out.tolist() == [[3, 4, 5], [6, 7, 99]] and forced.tolist() == [False, True]
    assert cands.tolist() == [[3, 4, 5], [6, 7, 8]]  # the retriever's array is left as it was
    same = np.array([[3, 4, 5]], dtype=np.int32)
    out, _ = force_target(same, np.array([9]))
    assert same.tolist() == [[3, 4, 5]] and out.tolist() == [[3, 4, 9]]  # not written through, even when int32


def test_shuffle_is_pinned_per_seed_and_row():
    cands = np.arange(10, 16, dtype=np.int32).reshape(1, 6).repeat(3, 0)
    shown, tix = shuffle_candidates(cands, np.array([10, 11, 15]), seed=5)
    assert shown.tolist() == [[11, 14, 12, 13, 15, 10], [12, 10, 15, 14, 13, 11], [10, 14, 15, 13, 11, 12]]
    assert tix.tolist() == [5, 5, 2] and tix.dtype == np.int64
    again, _ = shuffle_candidates(cands, np.array([10, 11, 15]), seed=5)
    assert np.array_equal(again, shown)
    assert not np.array_equal(shuffle_candidates(cands, np.array([10, 11, 15]), seed=6)[0], shown)


def test_shuffle_refuses_one_missing_target_among_present_ones():
    cands = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"^a target is missing from its candidates; call force_target first$"):
        shuffle_candidates(cands, np.array([2, 9]), seed=0)


def test_build_samples_targets_are_int32():
    train = [np.array([5, 6, 7], np.int64)]
    s = build_samples(train, np.array([0, 0]), np.array([1, 2]), np.array([[6, 1, 2], [3, 4, 5]]), seed=0)
    assert s.target.tolist() == [6, 7] and s.target.dtype == np.int32
    assert s.forced.tolist() == [False, True] and s.shown.dtype == np.int32


# ---- the chi-square p-value ----------------------------------------------------------------------------------

def reference_pvalue(counts: np.ndarray) -> float:
    """Q(dof/2, chi2/2), the regularized upper incomplete gamma function, at 50 digits."""
    k = len(counts)
    mpmath.mp.dps = 50
    expected = mpmath.mpf(int(counts.sum())) / k
    chi2 = sum((mpmath.mpf(int(c)) - expected) ** 2 / expected for c in counts)
    return float(mpmath.gammainc(mpmath.mpf(k - 1) / 2, chi2 / 2, mpmath.inf, regularized=True))


def as_indices(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


# counts per position; chi2/2 below, at and above dof/2 + 1 (the switch from the series to the continued
# fraction), with integer (odd k) and half-integer (even k) dof/2, down to p-values near 1e-40
CASES = [
    [10, 10, 10, 11],  # k=4, tiny chi2: p near 1
    [12, 8, 10, 10],
    [30, 5, 10, 15],
    [60, 2, 3, 1],
    [200, 0, 0, 0],  # p ~ 1e-130
    [7, 3],  # k=2, dof 1
    [9, 1],
    [40, 0],
    [5, 6, 4, 5, 5],  # k=5, dof 4: a = 2
    [9, 2, 4, 5, 5],
    [20, 0, 1, 2, 2],
    [3, 4, 3, 5, 2, 4, 3, 6, 4, 3, 5, 4, 2, 3, 4, 5, 3, 4, 6, 3],  # K=20, dof 19
    [12, 1, 3, 2, 4, 3, 2, 1, 3, 2, 4, 3, 2, 1, 3, 2, 4, 3, 2, 1],
    [60, 0, 1, 0, 1, 0, 2, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0],
    [4] * 20 + [9],  # k=21, dof 20: a = 10
    [14, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6],
]


@pytest.mark.parametrize("counts", CASES, ids=[f"k{len(c)}-{i}" for i, c in enumerate(CASES)])
def test_pvalue_matches_the_regularized_gamma(counts):
    counts = np.array(counts)
    got = position_uniformity_pvalue(as_indices(counts.tolist()), len(counts))
    want = reference_pvalue(counts)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_pvalue_spans_both_branches():
    """The cases above reach both the series (x < a + 1) and the continued fraction, with and without
    the series' early stop: this guards the test itself."""
    xs = []
    for c in CASES:
        c = np.array(c, dtype=float)
        e = c.sum() / len(c)
        xs.append((((c - e) ** 2 / e).sum() / 2, (len(c) - 1) / 2))
    assert any(x < a + 1 for x, a in xs) and any(x >= a + 1 for x, a in xs)
    assert any(x > 10 * (a + 1) for x, a in xs)


def test_exactly_uniform_counts_give_one():
    assert position_uniformity_pvalue(as_indices([3] * 20), 20) == 1.0
    assert position_uniformity_pvalue(as_indices([1, 1]), 2) == 1.0


def test_positions_never_drawn_count_as_zeros():
    """minlength=k: positions 2..4 never chosen are cells with count 0, not absent cells."""
    got = position_uniformity_pvalue(np.array([0] * 5 + [1] * 5), 5)
    assert got == pytest.approx(reference_pvalue(np.array([5, 5, 0, 0, 0])), rel=1e-9)
