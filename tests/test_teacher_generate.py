"""Generate mode's rows say what they are: a decision state or not, cut by the budget or not, parsed or not.

With a fake backend whose answers are chosen here; the real teacher's first token is checked in
tests/test_teacher_model.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.store.check import verify_store
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from pipeline.teacher.parse import DECISION_STATUSES, STATUSES, generation_status, parse_ranking
from pipeline.evaluation.teacher_quality import TeacherQuality
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

CLEAN = "C] > [A] > [B] > [D] > [E] > [F] > [G] > [H]"  # after the prompt's '[': a full permutation of K=8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return load_inputs(*make_inputs(tmp_path_factory.mktemp("gen")))  # 10 samples, K=8


def dump(inputs, out: Path, backend: FakeBackend, **cfg):
    report = run_dump(DumpConfig(mode="generate", shard_rows=4, **cfg), inputs, backend, FAKE_TEACHER, out)
    return report, pl.read_parquet(out / "*.parquet").sort("sample_id")


@pytest.mark.parametrize("answer, expected", [
    (CLEAN, "ok"),
    ("", "failed"),  # empty: EOS first
    ("!!!! ???", "failed"),  # garbage without any identifier
    ("The ranking: [C] > [A] > [B] > [D] > [E] > [F] > [G] > [H]", "no_decision"),  # clean list, wrong first token
    (" ] [A] > [B]", "no_decision"),
    ("C] > [A] Toy Story", "repaired"),
])
def test_empty_and_garbage_answers_are_not_ok(inputs, tmp_path, answer, expected):
    """Fails if a generation whose first token is not an identifier is stored as `ok` (before the fix,
    'The ranking: [C] > ...' parsed to a clean permutation and was `ok`, h_dec and all)."""
    report, df = dump(inputs, tmp_path / "s", FakeBackend([answer]))
    assert report.status == {expected: inputs.samples.height}
    assert set(df["status"]) == {expected}
    assert verify_store(tmp_path / "s") == []  # `cache verify` knows every status the dump writes


def test_budget_hits_are_recorded_per_row(inputs, tmp_path):
    """Fails if a row that the decode budget stopped is not marked (its ranking is incomplete by
    construction: the rate of such rows is the truncation rate evaluate reports)."""
    backend = FakeBackend([CLEAN, "C] > [A] > [B]"], hit_budget=[False, True])
    report, df = dump(inputs, tmp_path / "s", backend)
    assert report.status == {"ok": 5, "cut": 5}  # every second row of each shard was stopped by the budget
    cut = df.filter(pl.col("status") == "cut")
    assert all(g == "[C] > [A] > [B]" for g in cut["generated"])
    assert cut["ranking"][0].to_list() == [2, 0, 1, 3, 4, 5, 6, 7]  # what was written, then the rest in shown order
    assert verify_store(tmp_path / "s") == []


def test_default_budget_leaves_room_for_a_ranking_with_titles(inputs, tmp_path):
    """Fails if the default decode budget cannot hold `[A] Title` for every candidate of the longest
    sample (the old default, 4 tokens per candidate, cut the real teacher after 6-8 of 20)."""
    backend = FakeBackend([CLEAN])
    dump(inputs, tmp_path / "s", backend)
    budgets = set(backend.max_new_tokens)
    assert len(budgets) == 1
    budget = budgets.pop()
    # independently: the character tokenizer's length of the full answer, titles included
    df = pl.read_parquet(tmp_path / "s" / "*.parquet")
    longest = max(len("\n".join(f"[{chr(65 + i)}] {inputs.titles[c]}" for i, c in enumerate(cands)))
                  for cands in df["candidates"].to_list())
    assert budget >= longest
    settings = __import__("json").loads((tmp_path / "s" / "manifest.json").read_text())["settings"]
    assert settings["max_new_tokens"] == budget  # the store records the budget actually used
    backend = FakeBackend([CLEAN])
    dump(inputs, tmp_path / "t", backend, max_new_tokens=17)
    assert set(backend.max_new_tokens) == {17}  # an explicit budget is passed through


def test_generation_status_order():
    """The most severe fact wins: no identifier at all, then no decision state, then the budget."""
    parsed_ok = parse_ranking("[B] > [A]", "AB")
    assert generation_status(parsed_ok, True, False) == "ok"
    assert generation_status(parsed_ok, True, True) == "cut"
    assert generation_status(parsed_ok, False, True) == "no_decision"
    assert generation_status(parse_ranking("[", "AB"), False, True) == "failed"
    assert generation_status(parse_ranking("[B]", "AB"), True, False) == "repaired"
    assert set(DECISION_STATUSES) < set(STATUSES) and "no_decision" not in DECISION_STATUSES


def test_teacher_report_counts_no_decision_and_cut_rows():
    """Fails if evaluate's teacher report hides rows that are not decision states or were cut."""
    k = 3
    cands = np.array([[1, 2, 3]] * 5)
    ranking = np.array([[0, 1, 2]] * 5)
    target = np.array([1, 2, 3, 1, 2])
    status = np.array(["ok", "no_decision", "cut", "cut", "failed"], dtype=object)
    q = TeacherQuality(k)
    q.update(cands, ranking, target, status)
    r = q.result()
    assert r["no_decision_rate"] == 0.2 and r["cut_rate"] == 0.4 and r["parse_failure_rate"] == 0.2
    assert r["status_counts"] == {"ok": 1, "no_decision": 1, "cut": 2, "failed": 1}
    # the teacher's ranking counts where it came from the model's answer, with a decision state
    assert r["teacher"]["samples_scored"] == 3
