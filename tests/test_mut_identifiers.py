"""Identifier schemes and the single-token check, where mutation testing found the suite blind
(docs/MUTATION.md). The fake tokenizers each reproduce one way a real tokenizer can break the
decision step."""

from __future__ import annotations

import re

import pytest

from pipeline.errors import UsageError
from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
from tests.teacher_fixtures import CharTokenizer

BOS = 1


class BosTokenizer(CharTokenizer):
    """Like a Hugging Face tokenizer: prepends BOS unless special tokens are explicitly turned off."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([] if add_special_tokens is False else [BOS]) + [ord(c) for c in text]


class SplitCloseTokenizer(CharTokenizer):
    """']' alone is two byte-level pieces (ids 2 and 3); '[' stays one token."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [t for c in text for t in ((2, 3) if c == "]" else (ord(c),))]


class SplitOpenTokenizer(CharTokenizer):
    """'[' alone is two pieces; ']' stays one token."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [t for c in text for t in ((2, 3) if c == "[" else (ord(c),))]


class ContextBracketTokenizer(CharTokenizer):
    """'[' before a label is another token than '[' alone (as with a leading-space variant): three
    tokens, but the first is not the decision prompt's '['."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [ord(c) for c in text]
        return [5000 if t == ord("[") and i + 1 < len(ids) else t for i, t in enumerate(ids)]


class MergedCloseTokenizer(CharTokenizer):
    """'A]' merges into one token: '[A]' is two tokens, '[' and 'A]'."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) == 3 and text[0] == "[" and text[2] == "]":
            return [ord("["), 7000 + ord(text[1])]
        return [ord(c) for c in text]


class UnknownLabelTokenizer(CharTokenizer):
    """A vocabulary without the label characters: every label is the same <unk> token."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) if c in "[]" else 0 for c in text]


def test_tokenizer_that_adds_bos_by_default_still_passes():
    """Fails if any of the three encode calls drops add_special_tokens=False: a Hugging Face
    tokenizer then prepends BOS and every bracket check sees the wrong tokens."""
    scheme = make_scheme("letters", 5)
    assert identifier_token_ids(scheme, BosTokenizer()) == [ord(c) for c in "ABCDE"]


@pytest.mark.parametrize("tok", [SplitCloseTokenizer(), SplitOpenTokenizer()])
def test_either_bracket_split_in_two_is_refused(tok):
    """Fails if only one of '[' and ']' has to be a single token, or the message stops saying why."""
    with pytest.raises(UsageError) as e:
        identifier_token_ids(make_scheme("letters", 3), tok)
    assert str(e.value) == (
        "this tokenizer does not encode '[' and ']' as single tokens; bracketed identifiers cannot be used")


def test_label_whose_bracket_is_another_token_is_refused():
    """Fails if a three-token '[A]' is accepted although its '[' is not the '[' the prompt ends with."""
    with pytest.raises(UsageError, match="is not single-token"):
        identifier_token_ids(make_scheme("letters", 3), ContextBracketTokenizer())


def test_label_merged_with_the_closing_bracket_is_refused():
    """Fails if '[A]' of two tokens ('[' + 'A]') slips through the length check."""
    with pytest.raises(UsageError, match=r"'\[A\]' tokenizes as \['\[', '.*'\]"):
        identifier_token_ids(make_scheme("letters", 3), MergedCloseTokenizer())


def test_hint_to_switch_to_letters_only_for_other_schemes():
    """Fails if the letters scheme is told to use letters, or the digits hint loses its wording."""
    with pytest.raises(UsageError) as e:
        identifier_token_ids(make_scheme("letters", 3), MergedCloseTokenizer())
    assert str(e.value).endswith("so the first identifier token cannot tell candidates apart")
    with pytest.raises(UsageError) as e:
        identifier_token_ids(make_scheme("digits", 12), CharTokenizer())
    assert str(e.value).endswith("cannot tell candidates apart; use --identifiers letters (K <= 26)")


def test_two_labels_on_one_token_are_refused():
    """Fails if the distinctness check is dropped or its message lost: with every label on <unk>,
    the K logits read at the decision step would all be the same number."""
    with pytest.raises(UsageError, match=r"^identifier scheme 'letters' maps two labels to the same token"):
        identifier_token_ids(make_scheme("letters", 4), UnknownLabelTokenizer())


def test_scheme_sizes_at_the_bounds():
    """Fails if K=2 or K=26 letters are refused, K=1 accepted, or the scheme forgets its name."""
    two = make_scheme("letters", 2)
    assert (two.name, two.labels, two.k) == ("letters", ("A", "B"), 2)
    assert make_scheme("letters", 26).labels[-1] == "Z"
    digits = make_scheme("digits", 2)
    assert (digits.name, digits.labels, digits.bracketed(1)) == ("digits", ("1", "2"), "[2]")
    for k in (1, 0):
        with pytest.raises(UsageError, match=re.escape(f"need at least 2 candidates per sample to rank, got K={k}")):
            make_scheme("letters", k)
    with pytest.raises(UsageError, match=r"choose one of letters, digits$"):
        make_scheme("emoji", 5)
