"""Models without a chat template (base models, as LlamaRec tunes) get the template as plain text.

The rendering ends with 'Answer:' on its own line and '[' as a separate last token, so the decision
position is the same kind of position as in the chat rendering. Checked on the real embedded tokenizer
with its chat template removed, and end to end: a teacher directory without a chat template dumps a
store whose h_dec is the model's last hidden state at that plain prompt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.errors import UsageError
from pipeline.teacher.identifiers import make_scheme
from pipeline.teacher.prompt import load_template, plain_text, prompt_format, render_prompt
from tests.teacher_fixtures import CharTokenizer, make_inputs

HISTORY = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"]
CANDS = ["Alien (1979)", "Babe (1995)", "Casino (1995)", "Dune (1984)"]


class PlainCharTokenizer(CharTokenizer):
    """A character tokenizer with no chat template that, like Llama's, adds a BOS token by default."""

    chat_template = None
    bos_token = "^"
    bos_token_id = ord("^")

    def apply_chat_template(self, *a, **k):  # what HF raises when chat_template is None
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = super().encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens else ids


def test_format_follows_the_tokenizer():
    """Fails if a tokenizer without a chat template is sent to apply_chat_template (HF raises), or if a
    tokenizer-like object without the attribute (our fakes, custom tokenizers) loses its chat rendering."""
    assert prompt_format(PlainCharTokenizer()) == "plain"
    assert prompt_format(CharTokenizer()) == "chat"
    scheme = make_scheme("letters", 4)
    r = render_prompt(load_template(), PlainCharTokenizer(), HISTORY, CANDS, scheme, 10_000, ord("["))
    assert r.text.startswith("^You are RankLLM")  # BOS first, because this tokenizer adds one
    assert r.text.endswith("\n\nAnswer:\n[") and r.input_ids[-1] == ord("[")
    assert "[A] Alien (1979)\n[B] Babe (1995)" in r.text and "3. Fargo (1996)" in r.text
    assert plain_text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "S\n\nU\n\nAnswer:\n"


def test_plain_prompt_truncates_like_the_chat_one():
    """Fails if the plain rendering bypasses the history-dropping search (it must keep the newest items)."""
    scheme = make_scheme("letters", 4)
    full = render_prompt(load_template(), PlainCharTokenizer(), HISTORY, CANDS, scheme, 10_000, ord("["))
    cut = render_prompt(load_template(), PlainCharTokenizer(), HISTORY, CANDS, scheme,
                        len(full.input_ids) - 5, ord("["))
    assert cut.truncated and cut.n_history == 2 and "Toy Story" not in cut.text and "1. Heat (1995)" in cut.text


@pytest.fixture(scope="module")
def real_tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from pipeline.teacher.convert import resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher("embedded").location)
    assert tok.chat_template is not None
    return tok


@pytest.mark.teacher
def test_real_tokenizer_without_its_chat_template(real_tokenizer):
    """Fails if the plain text merges '[' with the line before it on a real BPE tokenizer, or if chat
    markup leaks into a plain prompt."""
    open_id = real_tokenizer.convert_tokens_to_ids("[")
    chat = render_prompt(load_template(), real_tokenizer, HISTORY, CANDS, make_scheme("letters", 4), 4096, open_id)
    original, real_tokenizer.chat_template = real_tokenizer.chat_template, None
    try:
        r = render_prompt(load_template(), real_tokenizer, HISTORY, CANDS, make_scheme("letters", 4), 4096, open_id)
    finally:
        real_tokenizer.chat_template = original
    assert "<|im_start|>" in chat.text and "<|im_start|>" not in r.text
    assert r.input_ids[-1] == open_id and real_tokenizer.convert_ids_to_tokens(r.input_ids[-2:]) == ["Ċ", "["]
    assert r.input_ids == real_tokenizer.encode(r.text, add_special_tokens=False)


class _NoBracket(PlainCharTokenizer):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = super().encode(text, add_special_tokens)
        return ids[:-2] + [999] if text.endswith(":\n[") else ids  # merges "\n[" like a careless BPE


def test_plain_prompt_refuses_a_merged_bracket():
    """Fails if a plain prompt whose '[' merged with the newline is accepted (the decision position would
    be wrong); the message names the plain rendering."""
    with pytest.raises(UsageError, match="'Answer:' line of the plain-text rendering"):
        render_prompt(load_template(), _NoBracket(), HISTORY, CANDS, make_scheme("letters", 4), 10_000, ord("["))


@pytest.mark.teacher
def test_teacher_without_chat_template_dumps_the_plain_decision_state(tmp_path):
    """A teacher directory without a chat template (the embedded one with chat_template.jinja removed):
    teacher-dump renders plain prompts and stores hidden_states[-1][0, -1] of that exact text. Fails if
    the HF backend still tries the chat template (it raises) or stores another position."""
    pytest.importorskip("transformers")
    import torch

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    src = Path(resolve_teacher("embedded").location)
    base = tmp_path / "base-model"
    base.mkdir()
    for f in src.iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.suffix == ".safetensors":
            (base / f.name).symlink_to(f)
        else:
            shutil.copy(f, base / f.name)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))

    teacher = HFTeacher(HFConfig(str(base), dtype="float32", batch_size=3))
    assert teacher.tokenizer.chat_template is None
    inputs = load_inputs(*make_inputs(tmp_path / "in"), limit=5)
    facts = {"name": "base", "revision": "test", "hidden_size": teacher.hidden_size, "dtype": teacher.dtype_name}
    run_dump(DumpConfig(shard_rows=4), inputs, teacher, facts, tmp_path / "store")
    df = pl.read_parquet(tmp_path / "store" / "*.parquet").sort("sample_id")
    assert df.height == 5
    for row in df.head(3).iter_rows(named=True):
        assert row["prompt"].endswith("\n\nAnswer:\n[") and "<|im_start|>" not in row["prompt"]
        ids = torch.tensor([teacher.tokenizer.encode(row["prompt"], add_special_tokens=False)])
        with torch.inference_mode():
            h = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float().numpy()
        stored = np.asarray(row["h_dec"], dtype=np.float32)
        assert np.abs(stored - h).max() <= 1e-3 * np.abs(h).max()
