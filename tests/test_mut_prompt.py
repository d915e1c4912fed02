"""The prompt renderer, where mutation testing found the suite blind (docs/MUTATION.md): the exact
messages the teacher is shown, template parsing edge cases, and truncation that keeps the longest
history that fits (a hypothesis property against brute force)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import UsageError
from pipeline.teacher.identifiers import make_scheme
from pipeline.teacher.prompt import load_template, parse_template, render_prompt
from tests.teacher_fixtures import CharTokenizer

BRACKET = ord("[")
ALL_FIELDS = ("=== system ===\nSys {num} {first}..{last}\n=== user ===\n"
              "H:\n{history}\nC:\n{candidates}\n{num} from {first} to {last}")


class RecordingTokenizer(CharTokenizer):
    """CharTokenizer that keeps the conversation it was asked to render."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, str]]] = []

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=True):
        self.seen.append(conversation)
        return super().apply_chat_template(conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt)


class HFDefaultsTokenizer(CharTokenizer):
    """A Hugging Face tokenizer's defaults: apply_chat_template tokenizes and adds no generation prompt
    unless told otherwise; encode prepends BOS unless add_special_tokens is False."""

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in conversation)
        text += "<assistant>\n" if add_generation_prompt else ""
        return [ord(c) for c in text] if tokenize else text

    def encode(self, text, add_special_tokens=True):
        return ([] if add_special_tokens is False else [1]) + [ord(c) for c in text]


class MergingBracketTokenizer(CharTokenizer):
    """Merges '\\n[' into one token, so the prompt's final '[' is not a token of its own."""

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("\n[", i):
                ids.append(9000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def _render(template, history, candidates, max_tokens=100_000, tok=None):
    scheme = make_scheme("letters", len(candidates))
    return render_prompt(template, tok or CharTokenizer(), history, candidates, scheme, max_tokens, BRACKET)


def test_messages_hold_every_field_exactly():
    """Fails if history numbering, the candidate lines, {num}, {first}, {last} or the message roles change."""
    tok = RecordingTokenizer()
    _render(parse_template(ALL_FIELDS), ["Old", "New"], ["X", "Y", "Z"], tok=tok)
    assert tok.seen[-1] == [
        {"role": "system", "content": "Sys 3 [A]..[C]"},
        {"role": "user", "content": "H:\n1. Old\n2. New\nC:\n[A] X\n[B] Y\n[C] Z\n3 from [A] to [C]"},
    ]


def test_empty_history_is_written_as_no_history():
    """Fails if a user without history gets an empty line instead of '(no history)'."""
    tok = RecordingTokenizer()
    _render(parse_template("=== user ===\n{history}|{candidates}"), [], ["X", "Y"], tok=tok)
    assert tok.seen[-1] == [{"role": "user", "content": "(no history)|[A] X\n[B] Y"}]


def test_template_without_system_section_sends_only_the_user_message():
    """Fails if a system message is sent (or formatted from None) when the template has none."""
    tok = RecordingTokenizer()
    _render(parse_template("{history} {candidates}"), ["Old"], ["X", "Y"], tok=tok)
    assert [m["role"] for m in tok.seen[-1]] == ["user"]


def test_hugging_face_defaults_do_not_change_the_prompt():
    """Fails if render_prompt relies on the tokenizer's defaults: it must ask for text (tokenize=False),
    the assistant header (add_generation_prompt=True), and ids without BOS."""
    tpl = parse_template(ALL_FIELDS)
    ours = _render(tpl, ["Old"], ["X", "Y"])
    hf = _render(tpl, ["Old"], ["X", "Y"], tok=HFDefaultsTokenizer())
    assert (hf.text, hf.input_ids) == (ours.text, ours.input_ids)
    assert hf.text.endswith("<assistant>\n[") and hf.input_ids[0] != 1


def test_merged_final_bracket_is_refused_with_the_reason():
    """Fails if a prompt whose '[' merged with the assistant header is accepted, or the message changes."""
    with pytest.raises(UsageError) as e:
        _render(parse_template(ALL_FIELDS), ["Old"], ["X", "Y"], tok=MergingBracketTokenizer())
    assert str(e.value) == (
        "the rendered prompt does not end with a separate '[' token (the tokenizer merged it with the assistant "
        "header); the decision position would be wrong for this model")


def test_candidate_count_must_match_the_scheme():
    """Fails if a candidate list longer than the scheme is rendered, or the error stops naming both numbers."""
    with pytest.raises(ValueError, match=r"^3 candidates but the scheme has 2 identifiers$"):
        render_prompt(parse_template(ALL_FIELDS), CharTokenizer(), [], ["X", "Y", "Z"], make_scheme("letters", 2),
                      1000, BRACKET)


def test_repeated_section_marks_belong_to_the_section_text():
    """Fails if the first '=== user ===' or '=== system ===' does not open its section (a later repeat
    is section text), or the parsed template drops its source text."""
    text = ("=== system ===\nA\n=== system ===\nB\n=== user ===\n{history}\n=== user ===\n{candidates}")
    t = parse_template(text)
    assert t.system == "A\n=== system ===\nB"
    assert t.user == "{history}\n=== user ===\n{candidates}"
    assert t.text == text


def test_messages_name_the_source_and_how_to_fix_it(tmp_path: Path):
    """Fails if an error stops starting with the template's source (the file path, or 'template' by
    default), or loses the hint on literal braces."""
    with pytest.raises(UsageError, match=r"^template: the user section must contain"):
        parse_template("{history}")
    with pytest.raises(UsageError, match=r"^t\.txt: malformed placeholder"):
        parse_template("{history} {candidates} {", source="t.txt")
    with pytest.raises(UsageError, match=r"^t\.txt: the user section must contain"):
        parse_template("{candidates}", source="t.txt")
    with pytest.raises(UsageError) as e:
        parse_template("{history} {candidates} {oops}", source="t.txt")
    assert str(e.value).endswith("(write literal braces as '{{' and '}}')")
    bad = tmp_path / "bad.txt"
    bad.write_text("{history}", encoding="utf-8")
    with pytest.raises(UsageError, match="^" + str(bad).replace(".", r"\.") + ": the user section"):
        load_template(bad)


def test_template_file_is_read_as_utf8(tmp_path: Path):
    """Fails if a template file is not read (the packaged one used instead) or not decoded as UTF-8."""
    path = tmp_path / "mine.txt"
    text = "=== user ===\nGesehen — {history}\nKandidaten: {candidates} ✓"
    path.write_bytes(text.encode("utf-8"))
    t = load_template(path)
    assert t.text == text and t.user.startswith("Gesehen —") and t.system is None
    assert load_template().text.startswith("=== system ===\nYou are RankLLM")


# Titles longer than '(no history)', so that "only the empty history fits" is a reachable case.
HISTORY = [f"Movie number {i} (1995)" for i in range(9)]


def _length(tpl, history, candidates):
    return len(_render(tpl, history, candidates).input_ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_history=st.integers(0, 9), slack=st.integers(-1, 1), keep=st.integers(0, 9))
def test_truncation_keeps_the_longest_suffix_that_fits(n_history, slack, keep):
    """Fails if the binary search misses the longest history suffix that fits (off-by-one bounds, a
    strict comparison at the budget, a wrong start), keeps other than the newest items, or refuses a
    prompt that fits with no history. Expected value by brute force over every suffix length."""
    tpl = parse_template(ALL_FIELDS)
    history, cands = HISTORY[:n_history], ["X", "Y"]
    lengths = [_length(tpl, history[len(history) - n:] if n else [], cands) for n in range(n_history + 1)]
    budget = lengths[min(keep, n_history)] + slack  # right at, just under and just over a boundary
    fits = [n for n in range(n_history + 1) if lengths[n] <= budget]
    # '(no history)' can be longer than one short history line: the contract is to refuse only when the
    # prompt without history does not fit (the message says so), and otherwise keep the longest suffix.
    if lengths[n_history] > budget and lengths[0] > budget:
        with pytest.raises(UsageError, match=f"does not fit in {budget} tokens even without history"):
            _render(tpl, history, cands, budget)
        return
    r = _render(tpl, history, cands, budget)
    best = max(fits)
    assert r.n_history == best and r.truncated == (best < n_history)
    assert len(r.input_ids) == lengths[best] <= budget
    kept = history[n_history - best:]
    assert r.text == _render(tpl, kept, cands).text
