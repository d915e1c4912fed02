"""Training windows as properties (hypothesis) plus the edge cases mutation testing found untested
(docs/MUTATION.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.sequences import left_pad, training_windows


@st.composite
def _case(draw):
    max_len = draw(st.integers(1, 10))
    stride = draw(st.one_of(st.none(), st.integers(1, max_len)))
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    return max_len, stride, lengths


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_every_target_trained_once_after_its_own_prefix(case):
    """Fails if a target is dropped or trained twice (e.g. a window starting at index 1 treated as a
    sequence's first), a window is cut at the wrong place, a target does not directly follow its input,
    or a target sees less than max_len - stride + 1 items of context when its prefix is longer."""
    max_len, stride, lengths = case
    seqs, offset = [], 0
    for n in lengths:  # distinct items: the value tells the position
        seqs.append(np.arange(offset + 1, offset + n + 1))
        offset += n + 100
    x, y = training_windows(seqs, max_len, stride)
    assert x.shape == y.shape and x.shape[1] == max_len
    assert x.dtype == np.int64 and y.dtype == np.int64
    expected = sorted(int(v) for s in seqs for v in s[1:])
    assert sorted(y[y != 0].tolist()) == expected
    first = {int(s[0]): s for s in seqs}
    for xi, yi in zip(x, y):
        nz = np.nonzero(xi)[0]
        assert len(nz) and nz[0] + len(nz) == max_len  # left padding, then a contiguous run
        assert (np.diff(xi[nz]) == 1).all()
        for j in np.nonzero(yi)[0]:
            assert yi[j] == xi[j] + 1
            seq = next(s for s in first.values() if s[0] <= yi[j] <= s[-1])
            prefix = int(yi[j] - seq[0])  # items before the target
            context = int((xi[: j + 1] != 0).sum())
            assert context >= min(prefix, max_len - (stride or max_len) + 1)


def test_sequences_too_short_for_a_pair_give_no_windows():
    """Fails if a one-item sequence yields an all-padding window, if a two-item sequence's single pair
    is dropped, or if the empty result is not two int64 arrays of shape (0, max_len)."""
    x, y = training_windows([np.array([7])], 4)
    assert x.shape == y.shape == (0, 4) and x.dtype == y.dtype == np.int64
    x, y = training_windows([], 3)
    assert x.shape == y.shape == (0, 3) and x.dtype == y.dtype == np.int64
    x, y = training_windows([np.array([7, 9])], 4)
    assert x.tolist() == [[0, 0, 0, 7]] and y.tolist() == [[0, 0, 0, 9]]


def test_stride_one_is_allowed_and_out_of_range_strides_are_refused():
    """Fails if stride 1 (maximal overlap) is refused, or a stride above max_len or below 1 accepted."""
    x, y = training_windows([np.arange(1, 7)], 3, 1)
    assert sorted(y[y != 0].tolist()) == [2, 3, 4, 5, 6]
    for bad in (4, -1):
        with pytest.raises(ValueError, match=r"^stride must be in 1\.\.max_len$"):
            training_windows([np.arange(1, 7)], 3, bad)


def test_left_pad_keeps_the_newest_items():
    """Fails if left_pad keeps the oldest items or pads on the right."""
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([], dtype=np.int64), np.array([9])], 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 9]]
