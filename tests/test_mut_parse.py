"""The lenient ranking parser: properties (hypothesis) and the cases mutation testing found untested
(docs/MUTATION.md)."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.teacher.parse import parse_ranking

# The machine is shared and loaded: no per-example deadline or slowness check, a modest number of examples.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_PIECES = st.sampled_from(["[", "]", ">", " > ", ",", ";", "\n", " ", "Toy Story (1995)", "[Z]", "[10]", "[ b ]",
                           "[AA]", "1.", "A", "C", "c", "[]", "[[", "]]"])


@st.composite
def _labels_and_text(draw):
    k = draw(st.integers(2, 26))
    labels = string.ascii_uppercase[:k]
    bracketed = st.sampled_from(labels).map(lambda x: f"[{x}]")
    text = "".join(draw(st.lists(st.one_of(bracketed, _PIECES), max_size=40)))
    return labels, text


@PROPERTY
@given(_labels_and_text())
def test_repair_always_yields_a_permutation_and_consistent_counts(case):
    """Fails if any generated text can give a ranking that is not a permutation of 0..K-1, or a status
    that contradicts the counts (failed iff nothing found; ok iff a clean full permutation)."""
    labels, text = case
    r = parse_ranking(text, labels)
    k = len(labels)
    assert sorted(r.ranking) == list(range(k))
    assert r.n_found + r.n_missing == k
    assert (r.status == "failed") == (r.n_found == 0)
    assert (r.status == "ok") == (r.n_found == k and r.n_duplicates == 0 and r.n_unknown == 0)
    # the model's own identifiers come first, in its order; the rest follow in shown order
    assert list(r.ranking[r.n_found:]) == sorted(r.ranking[r.n_found:])


@PROPERTY
@given(st.integers(2, 26).flatmap(lambda k: st.permutations(range(k))),
       st.sampled_from([" > ", ">", " ", "\n", ", "]))
def test_a_clean_ranking_is_read_back_exactly(perm, sep):
    """Fails if the parser reorders, drops or invents anything in a well-formed answer."""
    labels = string.ascii_uppercase[:len(perm)]
    r = parse_ranking(sep.join(f"[{labels[i]}]" for i in perm), labels)
    assert r.ranking == tuple(perm) and r.status == "ok" and not r.extra_text


def test_bracketless_answer_is_split_on_the_arrows():
    """Fails if a bracketless answer is split on anything but '>' (whitespace would read the arrows as
    unknown identifiers), or if its order is not kept."""
    r = parse_ranking("B > C > A", "ABC")
    assert r.ranking == (1, 2, 0) and r.status == "ok"
    assert (r.n_unknown, r.n_duplicates, r.extra_text) == (0, 0, False)


def test_bracketless_identifiers_lose_trailing_punctuation():
    """Fails if '.', ')' and the like are not stripped from a bracketless identifier, or if the strip
    removes letters that are identifiers themselves (X here)."""
    labels = string.ascii_uppercase[:24]
    r = parse_ranking("X. > A) > W, > B:", labels)
    assert r.ranking[:4] == (23, 0, 22, 1) and r.n_unknown == 0


def test_bracketless_titles_count_as_extra_text():
    """Fails if the words after each bracketless identifier are not what extra_text reports."""
    assert parse_ranking("C Toy > A > B", "ABC").extra_text
    assert parse_ranking("C Toy Story > A Babe > B", "ABC").ranking == (2, 0, 1)


def test_every_duplicate_is_counted():
    """Fails if duplicates are flagged but not counted."""
    r = parse_ranking("[A] > [B] > [A] > [B] > [A]", "ABC")
    assert r.n_duplicates == 3 and r.ranking == (0, 1, 2)


def test_a_full_answer_with_only_duplicates_or_only_unknowns_is_repaired_not_ok():
    """Fails if 'repaired' needs duplicates and unknowns together: either alone means the model's
    answer was not a clean permutation."""
    dup = parse_ranking("[A] > [B] > [A]", "AB")
    assert (dup.status, dup.n_missing, dup.n_unknown) == ("repaired", 0, 0)
    unknown = parse_ranking("[A] > [Q] > [B]", "AB")
    assert (unknown.status, unknown.n_missing, unknown.n_duplicates) == ("repaired", 0, 0)
