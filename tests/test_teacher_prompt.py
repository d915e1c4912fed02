"""Identifier scheme checks, template validation, prompt rendering and truncation (no model needed)."""

from __future__ import annotations

import pytest

from pipeline.errors import UsageError
from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
from pipeline.teacher.prompt import load_template, parse_template, render_prompt
from tests.teacher_fixtures import CharTokenizer


class DigitMergingTokenizer(CharTokenizer):
    """Like the real teacher but worse: '[A' merges into one token, so '[A]' is two tokens."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1000 if text.startswith("[A") else ord(text[0])] + [ord(c) for c in text[2 if text.startswith("[A") else 1:]]


def test_schemes_and_single_token_check():
    tok = CharTokenizer()
    letters = make_scheme("letters", 20)
    assert letters.labels[0] == "A" and letters.labels[-1] == "T" and letters.bracketed(2) == "[C]"
    assert identifier_token_ids(letters, tok) == [ord(c) for c in "ABCDEFGHIJKLMNOPQRST"]
    assert identifier_token_ids(make_scheme("digits", 9), tok) == [ord(str(i)) for i in range(1, 10)]
    with pytest.raises(UsageError, match=r"'\[10\]' tokenizes as \['\[', '1', '0', '\]'\].*--identifiers letters"):
        identifier_token_ids(make_scheme("digits", 12), tok)
    with pytest.raises(UsageError, match="not single-token"):
        identifier_token_ids(letters, DigitMergingTokenizer())
    with pytest.raises(UsageError, match="26 labels"):
        make_scheme("letters", 27)
    with pytest.raises(UsageError, match="unknown identifier scheme"):
        make_scheme("emoji", 5)


def test_packaged_template_is_valid_and_has_sections():
    t = load_template()
    assert t.system and "{history}" in t.user and "{candidates}" in t.user


@pytest.mark.parametrize("text, message", [
    ("=== user ===\nHistory: {history}", r"must contain the placeholder\(s\) \['\{candidates\}'\]"),
    ("=== user ===\n{history} {candidates} {user_name}", r"unknown placeholder\(s\) \['user_name'\]"),
    ("=== user ===\n{history} {candidates} {", "malformed placeholder"),
    ("preamble\n=== user ===\n{history} {candidates}", "must sit under a '=== system ===' line"),
])
def test_template_validation_messages(text, message):
    with pytest.raises(UsageError, match=message):
        parse_template(text, source="my.txt")


def test_template_without_sections_is_a_user_message():
    t = parse_template("Seen: {history}\nRank {num}: {candidates} as {first} > {last}")
    assert t.system is None and t.user.startswith("Seen:")


def test_render_ends_with_bracket_and_truncates_oldest_first():
    tok, scheme, tpl = CharTokenizer(), make_scheme("letters", 3), load_template()
    history = [f"Old movie {i}" for i in range(10)]
    full = render_prompt(tpl, tok, history, ["X", "Y", "Z"], scheme, 10_000, ord("["))
    assert full.text.endswith("<assistant>\n[") and full.input_ids[-1] == ord("[")
    assert not full.truncated and full.n_history == 10
    assert "[A] X\n[B] Y\n[C] Z" in full.text and "10. Old movie 9" in full.text
    budget = len(full.input_ids) - 20  # room for fewer history lines
    cut = render_prompt(tpl, tok, history, ["X", "Y", "Z"], scheme, budget, ord("["))
    assert cut.truncated and 0 < cut.n_history < 10 and len(cut.input_ids) <= budget
    assert "Old movie 9" in cut.text and "Old movie 0" not in cut.text  # oldest dropped first
    bigger = render_prompt(tpl, tok, history, ["X", "Y", "Z"], scheme, budget + 40, ord("["))
    assert bigger.n_history > cut.n_history  # the longest history that fits, not just any
    with pytest.raises(UsageError, match="does not fit in 50 tokens even without history"):
        render_prompt(tpl, tok, history, ["X", "Y", "Z"], scheme, 50, ord("["))
