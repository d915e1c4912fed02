"""Lenient ranking parser. The REAL_* literals are greedy outputs of the embedded SmolLM2-135M teacher
(generate mode, bf16, prompts from tests/teacher_fixtures.py and MovieLens-style titles), with the
prompt's final '[' put back in front, exactly as teacher-dump stores them."""

from __future__ import annotations

import pytest

from pipeline.teacher.parse import parse_ranking

L8 = "ABCDEFGH"
L20 = "ABCDEFGHIJKLMNOPQRST"

# K=20: the model copies the candidate list with titles and runs out of its 80-token budget.
REAL_K20_ECHO = ("[A] Angels and Insects (1995)\n[B] Mighty Aphrodite (1995)\n[C] Get Shorty (1995)\n"
                 "[D] Crimson Tide (1995)\n[E] Richard III (1995)\n[F] Toy Story (1995)\n[G]")
# K=20: numbered lines after the identifiers, a title repeated under new identifiers.
REAL_K20_NUMBERED = ("[A] 1. Seven (Se7en)\n[B] 2. Antonia's Line\n[C] 3. Apollo 13\n[D] 4. Birdcage\n"
                     "[E] 5. Birdcage\n[F] 6. Birdcage\n[G] 7. Birdcage\n[H] 8.")
# K=8, 40-token budget: cut in the middle of a title.
REAL_K8_CUT = "[A] Doom Generation, The (1995)\n[B] Crimson Tide (1995)\n[C] Batman Forever (1995"
REAL_K8_TITLES = "[A] Batman Forever (1995)\n[B] Belle de Jour (1967)\n[C] Postino, Il (1994)\n"


@pytest.mark.parametrize("text, labels, n_found", [
    (REAL_K20_ECHO, L20, 7), (REAL_K20_NUMBERED, L20, 8), (REAL_K8_CUT, L8, 3), (REAL_K8_TITLES, L8, 3),
])
def test_real_outputs_are_repaired_in_original_order(text, labels, n_found):
    r = parse_ranking(text, labels)
    assert r.status == "repaired" and r.n_found == n_found and r.extra_text
    assert r.n_missing == len(labels) - n_found and r.n_duplicates == r.n_unknown == 0
    assert r.ranking == tuple(range(len(labels)))  # the model echoed A, B, C...; the rest appended in order


def test_clean_permutation_is_ok():
    r = parse_ranking("[C] > [A] > [H] > [B] > [D] > [E] > [G] > [F]", L8)
    assert r.status == "ok" and r.ranking == (2, 0, 7, 1, 3, 4, 6, 5) and not r.extra_text


def test_titles_after_identifiers_are_tolerated():
    r = parse_ranking("[C] Toy Story (1995) > [A] Seven (Se7en) (1995) > [B] Babe", "ABC")
    assert r.status == "ok" and r.ranking == (2, 0, 1) and r.extra_text


def test_duplicates_unknown_and_missing():
    r = parse_ranking("[C] > [A] > [C] > [Z] > [12] > [B]", "ABCDE")
    assert r.status == "repaired" and r.ranking == (2, 0, 1, 3, 4)
    assert (r.n_found, r.n_duplicates, r.n_unknown, r.n_missing) == (3, 1, 2, 2)


def test_brackets_missing_and_lowercase():
    assert parse_ranking("C > A > B", "ABC").ranking == (2, 0, 1)
    assert parse_ranking("[ c ] > [a] > [B]", "ABC").status == "ok"


@pytest.mark.parametrize("text", ["", "I cannot rank these movies.", "Toy Story is the best"])
def test_no_identifier_is_failed_and_keeps_shown_order(text):
    r = parse_ranking(text, L8)
    assert r.status == "failed" and r.ranking == tuple(range(8)) and r.n_found == 0


def test_digit_labels():
    r = parse_ranking("[3] > [1] > [2]", ["1", "2", "3"])
    assert r.ranking == (2, 0, 1) and r.status == "ok"
