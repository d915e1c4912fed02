"""Candidate identifiers shown to the teacher (`[A]`..`[T]`) and the check that each is one token.

The decision step reads the logit of each identifier's token right after `[`. That only works if
every identifier is exactly one token there: the default teacher splits `[10]` into `[`, `1`, `0`,
`]`, so with digits the first identifier token cannot tell 1 from 10-19 (DESIGN.md point 2).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal, Protocol

from pipeline.errors import UsageError

SchemeName = Literal["letters", "digits"]
SCHEMES: tuple[str, ...] = ("letters", "digits")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class IdentifierScheme:
    name: str
    labels: tuple[str, ...]

    @property
    def k(self) -> int:
        return len(self.labels)

    def bracketed(self, i: int) -> str:
        return f"[{self.labels[i]}]"


def make_scheme(name: str, k: int) -> IdentifierScheme:
    """`letters`: A, B, ... (at most 26); `digits`: 1, 2, ..., k."""
    if k < 2:
        raise UsageError(f"need at least 2 candidates per sample to rank, got K={k}")
    if name == "letters":
        if k > 26:
            raise UsageError(f"the letters identifier scheme has 26 labels, but K={k}; use fewer candidates")
        return IdentifierScheme(name, tuple(string.ascii_uppercase[:k]))
    if name == "digits":
        return IdentifierScheme(name, tuple(str(i + 1) for i in range(k)))
    raise UsageError(f"unknown identifier scheme {name!r}; choose one of {', '.join(SCHEMES)}")


def identifier_token_ids(scheme: IdentifierScheme, tokenizer: Tokenizer) -> list[int]:
    """Token id of each label as the model emits it right after `[`; refuses a scheme that is not single-token.

    Checks `[X]` tokenizes as `[`, X, `]` with one token for X, and that the K tokens are distinct.
    """
    open_ids = tokenizer.encode("[", add_special_tokens=False)
    close_ids = tokenizer.encode("]", add_special_tokens=False)
    if len(open_ids) != 1 or len(close_ids) != 1:
        raise UsageError("this tokenizer does not encode '[' and ']' as single tokens; bracketed identifiers cannot be used")
    ids: list[int] = []
    for label in scheme.labels:
        enc = tokenizer.encode(f"[{label}]", add_special_tokens=False)
        if len(enc) != 3 or enc[0] != open_ids[0] or enc[2] != close_ids[0]:
            pieces = tokenizer.convert_ids_to_tokens(enc)
            hint = "; use --identifiers letters (K <= 26)" if scheme.name != "letters" else ""
            raise UsageError(
                f"identifier scheme {scheme.name!r} is not single-token for this tokenizer: "
                f"'[{label}]' tokenizes as {pieces}, so the first identifier token cannot tell candidates apart{hint}"
            )
        ids.append(enc[1])
    if len(set(ids)) != len(ids):
        raise UsageError(f"identifier scheme {scheme.name!r} maps two labels to the same token on this tokenizer")
    return ids
