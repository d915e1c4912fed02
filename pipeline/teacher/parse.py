"""Lenient parsing of a generated ranking such as `[C] > [A] Toy Story (1995) > [B] ...`, as RankLLM does.

Identifiers are read in order; anything else between them (titles, words) is tolerated. Duplicates
and unknown identifiers are dropped, and the candidates never mentioned are appended in their
original (shown) order. The status says whether the model's own answer was a full permutation.

A generated row's status also says whether its `h_dec` is a decision state and whether the decode
budget stopped the answer (`generation_status`), most severe first:
- failed: no candidate identifier in the answer; the ranking is the shown order and means nothing.
- no_decision: the model's own first generated token is not an identifier, so the state that
  produced it (`h_dec`) is not the decision "this candidate is first".
- cut: generation hit max_new_tokens before EOS; the ranking is what was written, missing appended.
- repaired / ok: as parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "repaired", "failed", "no_decision", "cut"]
STATUSES: tuple[str, ...] = ("ok", "repaired", "failed", "no_decision", "cut")
# Rows whose h_dec is the teacher's decision state and whose ranking came from the model's answer.
DECISION_STATUSES: tuple[str, ...] = ("ok", "repaired", "cut")

_BRACKETED = re.compile(r"\[\s*([^\[\]\s]{1,8})\s*\]")
_SEPARATORS = re.compile(r"[\s>,;]+")


@dataclass(frozen=True)
class ParseResult:
    ranking: tuple[int, ...]  # permutation of 0..K-1, best first
    status: Status  # ok: a clean permutation; repaired: fixed up; failed: no identifier found
    n_found: int  # valid, distinct identifiers the model wrote
    n_duplicates: int
    n_unknown: int
    n_missing: int  # appended in original order
    extra_text: bool  # words other than identifiers and separators (tolerated)


def parse_ranking(text: str, labels: Sequence[str]) -> ParseResult:
    index = {label.upper(): i for i, label in enumerate(labels)}
    found = _BRACKETED.findall(text)
    rest = _BRACKETED.sub(" ", text)
    if not found and ">" in text:
        # No brackets at all: accept `C > A > B`, one identifier leading each segment.
        segments = [s.strip() for s in text.split(">")]
        found = [s.split()[0].strip(".,:;)") for s in segments if s]
        rest = " ".join(" ".join(s.split()[1:]) for s in segments if s)
    seen: set[int] = set()
    ranking: list[int] = []
    n_dup = n_unknown = 0
    for token in found:
        i = index.get(token.upper())
        if i is None:
            n_unknown += 1
        elif i in seen:
            n_dup += 1
        else:
            seen.add(i)
            ranking.append(i)
    n_found = len(ranking)
    missing = [i for i in range(len(labels)) if i not in seen]
    ranking.extend(missing)
    extra = bool(_SEPARATORS.sub("", rest))
    if n_found == 0:
        status: Status = "failed"
    elif n_dup or n_unknown or missing:
        status = "repaired"
    else:
        status = "ok"
    return ParseResult(tuple(ranking), status, n_found, n_dup, n_unknown, len(missing), extra)


def generation_status(parsed: ParseResult, first_is_identifier: bool, hit_budget: bool) -> Status:
    """A generated row's status from its parse, the model's first token and the decode budget."""
    if parsed.status == "failed":
        return "failed"
    if not first_is_identifier:
        return "no_decision"
    if hit_budget:
        return "cut"
    return parsed.status
