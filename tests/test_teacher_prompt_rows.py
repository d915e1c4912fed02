"""What the teacher is shown, checked against the stored rows: the right history, the stored candidate order.

The prompt text is kept in the store (`store_prompt`), so each row's prompt is read back and taken
apart line by line, independently of the renderer, and compared with what the row claims: the last
`history_len` training items before `position`, oldest first, and the candidates in the stored order
with their identifiers. Each score and ranking index refers to that stored order, so a prompt that
lists the candidates in another order gives every score to the wrong item.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

HISTORY_LINE = re.compile(r"^(\d+)\. (.+)$")
CANDIDATE_LINE = re.compile(r"^\[([A-Z])\] (.+)$")
HISTORY_LEN = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    # per_user=6: user 0 (6 training items) has samples at positions 0..5, so histories run from
    # empty through shorter than, equal to and longer than HISTORY_LEN
    return load_inputs(*make_inputs(tmp_path_factory.mktemp("rows"), n_users=5, per_user=6))


def shown(prompt: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(history titles in prompt order, [(label, title)] in prompt order), from the prompt text alone."""
    history, candidates = [], []
    for line in prompt.splitlines():
        if m := HISTORY_LINE.match(line):
            assert int(m.group(1)) == len(history) + 1, "history lines are not numbered 1, 2, ..."
            history.append(m.group(2))
        elif m := CANDIDATE_LINE.match(line):
            candidates.append((m.group(1), m.group(2)))
    return history, candidates


def dump(inputs, out: Path, **cfg) -> pl.DataFrame:
    run_dump(DumpConfig(shard_rows=7, history_len=HISTORY_LEN, **cfg), inputs, FakeBackend(), FAKE_TEACHER, out)
    return pl.read_parquet(out / "*.parquet").sort("sample_id")


def test_prompt_shows_the_history_before_position_and_the_stored_candidate_order(inputs, tmp_path):
    """Fails if the history includes the target (`train[u][:pos + 1]`, leakage) or is not the last
    `history_len` items oldest first, and if the candidates are listed in retriever order while the
    store records the shuffled order."""
    df = dump(inputs, tmp_path / "s")
    titles = inputs.titles
    lengths = set()
    for row in df.iter_rows(named=True):
        u, pos = row["user_idx"], row["position"]
        history, candidates = shown(row["prompt"])
        expected = [titles[i] for i in inputs.train[u][max(0, pos - HISTORY_LEN):pos]]
        assert history == expected, f"sample {row['sample_id']}: history shown {history}, expected {expected}"
        assert titles[row["target"]] not in history  # the answer is never in the question
        if not expected:
            assert "(no history)" in row["prompt"]
        labels = [chr(ord("A") + i) for i in range(len(row["candidates"]))]
        assert candidates == [(lab, titles[c]) for lab, c in zip(labels, row["candidates"])]
        lengths.add(len(history))
        assert not row["truncated"]
    assert lengths == {0, 1, 2, 3, 4}  # every regime was checked
    # the shuffle is real: for most rows the stored order is not the retriever's
    retriever = {r["sample_id"]: r["candidates"] for r in inputs.samples.iter_rows(named=True)}
    differs = sum(list(r["candidates"]) != list(retriever[r["sample_id"]]) for r in df.iter_rows(named=True))
    assert differs > 0.8 * df.height
    assert all(sorted(r["candidates"]) == sorted(retriever[r["sample_id"]]) for r in df.iter_rows(named=True))


def test_truncated_prompts_drop_the_oldest_history_first(inputs, tmp_path):
    """Fails if a prompt over the budget loses recent history (or candidates) instead of the oldest items."""
    full = dump(inputs, tmp_path / "full")
    budget = int(full["prompt_tokens"].median())
    df = dump(inputs, tmp_path / "cut", max_prompt_tokens=budget)
    assert 0 < df["truncated"].sum() < df.height
    for row in df.iter_rows(named=True):
        u, pos = row["user_idx"], row["position"]
        history, candidates = shown(row["prompt"])
        expected = [inputs.titles[i] for i in inputs.train[u][max(0, pos - HISTORY_LEN):pos]]
        assert row["prompt_tokens"] <= budget
        assert len(candidates) == len(row["candidates"])  # candidates are never dropped
        if row["truncated"]:
            assert len(history) < len(expected) and history == expected[len(expected) - len(history):]
        else:
            assert history == expected
