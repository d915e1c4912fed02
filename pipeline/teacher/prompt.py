"""Listwise ranking prompt: a replaceable template file, rendered through the model's chat template.

The rendered prompt ends with the assistant header plus `[` (DESIGN.md point 1), so the next token
the model emits is the identifier of its top candidate and the last prompt position is the decision
state. History that does not fit the context is dropped oldest-first and the truncation is flagged.

A tokenizer without a chat template (a base model, as LlamaRec tunes) gets the same template as plain
text (`plain_text`): the sections separated by blank lines, then `Answer:` on its own line and `[`
on the next, after the tokenizer's BOS where it adds one. Which rendering a tokenizer gets is
`prompt_format(tokenizer)`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import UsageError
from pipeline.teacher.identifiers import IdentifierScheme

REQUIRED_FIELDS = frozenset({"history", "candidates"})
ALLOWED_FIELDS = REQUIRED_FIELDS | {"num", "first", "last"}
SYSTEM_MARK = "=== system ==="
USER_MARK = "=== user ==="
DECISION_SUFFIX = "["


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class PromptTemplate:
    """A template file: an optional `=== system ===` section and a `=== user ===` section."""

    text: str
    system: str | None
    user: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    input_ids: list[int]
    n_history: int  # history items that made it into the prompt
    truncated: bool  # True when older history items were dropped to fit the context


def default_template_text() -> str:
    return resources.files("pipeline").joinpath("templates/rank_prompt.txt").read_text(encoding="utf-8")


def load_template(path: Path | None = None) -> PromptTemplate:
    """Read and validate a template file (the packaged one when `path` is None)."""
    text = default_template_text() if path is None else Path(path).read_text(encoding="utf-8")
    return parse_template(text, source=str(path or "packaged rank_prompt.txt"))


def parse_template(text: str, source: str = "template") -> PromptTemplate:
    system: str | None = None
    user = text
    if USER_MARK in text:
        head, user = text.split(USER_MARK, 1)
        if SYSTEM_MARK in head:
            system = head.split(SYSTEM_MARK, 1)[1].strip() or None
        elif head.strip():
            raise UsageError(f"{source}: text before '{USER_MARK}' must sit under a '{SYSTEM_MARK}' line")
    user = user.strip()
    for part in (system or "", user):
        fields = _fields(part, source)
        unknown = fields - ALLOWED_FIELDS
        if unknown:
            raise UsageError(
                f"{source}: unknown placeholder(s) {sorted(unknown)}; allowed are {sorted(ALLOWED_FIELDS)} "
                "(write literal braces as '{{' and '}}')"
            )
    missing = REQUIRED_FIELDS - _fields(user, source)
    if missing:
        raise UsageError(f"{source}: the user section must contain the placeholder(s) {sorted('{' + m + '}' for m in missing)}")
    return PromptTemplate(text=text, system=system, user=user)


def _fields(text: str, source: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise UsageError(f"{source}: malformed placeholder ({e}); write literal braces as '{{{{' and '}}}}'") from e


def _messages(template: PromptTemplate, history: list[str], candidates: list[str], scheme: IdentifierScheme) -> list[dict[str, str]]:
    values = {
        "history": "\n".join(f"{i + 1}. {t}" for i, t in enumerate(history)) if history else "(no history)",
        "candidates": "\n".join(f"{scheme.bracketed(i)} {t}" for i, t in enumerate(candidates)),
        "num": str(len(candidates)),
        "first": scheme.bracketed(0),
        "last": scheme.bracketed(len(candidates) - 1),
    }
    msgs = []
    if template.system is not None:
        msgs.append({"role": "system", "content": template.system.format(**values)})
    msgs.append({"role": "user", "content": template.user.format(**values)})
    return msgs


PLAIN_ANSWER = "Answer:\n"


def prompt_format(tokenizer: Any) -> str:
    """'chat' when the tokenizer can render a chat, 'plain' for an HF tokenizer whose chat_template is None."""
    return "plain" if hasattr(tokenizer, "chat_template") and tokenizer.chat_template is None else "chat"


def _bos_text(tokenizer: Any) -> str:
    """The BOS token's text when the tokenizer adds one by default (Llama, Gemma), else '' (GPT-2 style)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    with_special = tokenizer.encode("x", add_special_tokens=True)
    return bos if with_special and with_special[0] == bos_id else ""


def plain_text(messages: list[dict[str, str]], bos: str = "") -> str:
    """The chat as plain text for a model without a chat template; `render_prompt` appends the '['."""
    return bos + "\n\n".join(m["content"] for m in messages) + "\n\n" + PLAIN_ANSWER


def render_prompt(
    template: PromptTemplate,
    tokenizer: ChatTokenizer,
    history: list[str],
    candidates: list[str],
    scheme: IdentifierScheme,
    max_tokens: int,
    open_bracket_id: int,
) -> RenderedPrompt:
    """Render history (oldest first) and candidates (in shown order); drop oldest history to fit `max_tokens`."""
    if len(candidates) != scheme.k:
        raise ValueError(f"{len(candidates)} candidates but the scheme has {scheme.k} identifiers")

    plain = prompt_format(tokenizer) == "plain"
    bos = _bos_text(tokenizer) if plain else ""

    def build(n_keep: int) -> tuple[str, list[int]]:
        kept = history[len(history) - n_keep :] if n_keep else []
        messages = _messages(template, kept, candidates, scheme)
        if plain:
            chat = plain_text(messages, bos)
        else:
            chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = chat + DECISION_SUFFIX
        return text, tokenizer.encode(text, add_special_tokens=False)

    text, ids = build(len(history))
    n_keep = len(history)
    if len(ids) > max_tokens:
        # Token count grows with the kept history: binary search the longest suffix that fits.
        lo, hi = 0, len(history) - 1
        text0, ids0 = build(0)
        if len(ids0) > max_tokens:
            raise UsageError(
                f"the prompt does not fit in {max_tokens} tokens even without history "
                f"({len(ids0)} tokens for the {len(candidates)} candidates); raise --max-prompt-tokens or use fewer candidates"
            )
        best = (0, text0, ids0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            t, i = build(mid)
            if len(i) <= max_tokens:
                lo, best = mid, (mid, t, i)
            else:
                hi = mid - 1
        n_keep, text, ids = best
    if ids[-1] != open_bracket_id:
        raise UsageError(
            "the rendered prompt does not end with a separate '[' token (the tokenizer merged it with the "
            + ("'Answer:' line of the plain-text rendering" if plain else "assistant header")
            + "); the decision position would be wrong for this model"
        )
    return RenderedPrompt(text=text, input_ids=ids, n_history=n_keep, truncated=n_keep < len(history))
