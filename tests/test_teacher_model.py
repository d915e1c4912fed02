"""Against the real embedded teacher (SmolLM2-135M-Instruct): where h_dec comes from, what the scores are.

The teacher is loaded once per session, in float32 so that the checks are tight; the store keeps
h_dec in float16, whose rounding (about 5e-4 relative) sets the tolerances below.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import UsageError
from pipeline.store.check import verify_store
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
from pipeline.teacher.parse import DECISION_STATUSES
from tests.teacher_fixtures import make_inputs

pytestmark = pytest.mark.teacher


@pytest.fixture(scope="session")
def teacher():
    pytest.importorskip("transformers")
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    source = resolve_teacher("embedded")
    return HFTeacher(HFConfig(source.location, dtype="float32", batch_size=4, max_new_tokens=24))


@pytest.fixture(scope="session")
def dumped(teacher, tmp_path_factory):
    """10 samples, K=8, batches of 4 (so left padding is exercised), first-token mode."""
    root = tmp_path_factory.mktemp("teacher")
    inputs = load_inputs(*make_inputs(root / "in"))
    facts = {"name": "smollm2", "revision": "test", "hidden_size": teacher.hidden_size, "dtype": teacher.dtype_name}
    run_dump(DumpConfig(shard_rows=5), inputs, teacher, facts, root / "store")
    return inputs, facts, root, pl.read_parquet(root / "store" / "*.parquet").sort("sample_id")


def full_model_state(teacher, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent recomputation: the whole CausalLM on one unpadded prompt, hidden_states[-1][0, -1]."""
    ids = torch.tensor([teacher.tokenizer.encode(text, add_special_tokens=False)])
    with torch.inference_mode():
        out = teacher.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float().numpy(), out.logits[0, -1].float().numpy()


def test_identifier_scheme_on_the_real_tokenizer(teacher):
    ids = identifier_token_ids(make_scheme("letters", 20), teacher.tokenizer)
    assert teacher.tokenizer.convert_ids_to_tokens(ids) == list("ABCDEFGHIJKLMNOPQRST")
    with pytest.raises(UsageError, match=r"'\[10\]' tokenizes as \['\[', '1', '0', '\]'\]"):
        identifier_token_ids(make_scheme("digits", 10), teacher.tokenizer)
    assert len(identifier_token_ids(make_scheme("digits", 9), teacher.tokenizer)) == 9


def test_h_dec_is_the_state_after_the_opening_bracket(teacher, dumped):
    _, _, _, df = dumped
    assert df["prompt_tokens"].n_unique() > 1  # prompts of different lengths were padded together
    for row in df.head(4).iter_rows(named=True):
        text = row["prompt"]
        assert text.endswith("<|im_start|>assistant\n[")
        stored = np.asarray(row["h_dec"], dtype=np.float32)
        h, logits = full_model_state(teacher, text)
        scale = np.abs(h).max()
        assert np.abs(stored - h).max() <= 1e-3 * scale, "stored h_dec is not the decision state"
        # the state one position earlier (the one that emits '[') is a different vector
        h_bracket, logits_bracket = full_model_state(teacher, text[:-1])
        assert np.abs(h_bracket - h).max() > 50 * 1e-3 * scale
        cos = h_bracket @ h / np.linalg.norm(h_bracket) / np.linalg.norm(h)
        assert cos < 0.97  # measured 0.93-0.94
        assert teacher.tokenizer.convert_ids_to_tokens([int(logits_bracket.argmax())]) == ["["]
        # after '[' the model's top token is an identifier letter
        assert teacher.tokenizer.convert_ids_to_tokens([int(logits.argmax())])[0] in "ABCDEFGH"


def test_scores_are_lm_head_of_h_dec_and_ranking_their_argsort(teacher, dumped):
    _, _, _, df = dumped
    ident = identifier_token_ids(make_scheme("letters", 8), teacher.tokenizer)
    w = teacher.model.get_output_embeddings().weight[ident].detach().float().numpy()  # [K, H]
    for row in df.iter_rows(named=True):
        scores = np.asarray(row["scores"], dtype=np.float32)
        assert row["ranking"] == np.argsort(-scores, kind="stable").tolist()
        # stored h_dec (float16) through the LM head reproduces the stored scores up to fp16 rounding
        recomputed = w @ np.asarray(row["h_dec"], dtype=np.float32)
        assert np.abs(recomputed - scores).max() <= 2e-3 * np.abs(scores).max() + 1e-2
    _, logits = full_model_state(teacher, df["prompt"][0])
    assert np.allclose(logits[ident], df["scores"][0].to_numpy(), rtol=1e-4, atol=1e-3)


def test_generate_mode_keeps_the_same_decision_state(teacher, dumped):
    inputs, facts, root, df = dumped
    few = replace(inputs, samples=inputs.samples.head(4))  # decoding is the slow part: 4 samples suffice
    run_dump(DumpConfig(shard_rows=5, mode="generate", max_new_tokens=24), few, teacher, facts, root / "gen")
    gen = pl.read_parquet(root / "gen" / "*.parquet").sort("sample_id")
    df = df.head(4)
    # every row is a decision state (the model's first token was an identifier); 24 tokens cannot hold
    # 8 identifiers with titles, so rows the budget stopped say so
    assert set(gen["status"]) <= set(DECISION_STATUSES), gen["status"].to_list()
    assert "cut" in set(gen["status"])
    assert all(g[1] in "ABCDEFGH" for g in gen["generated"])  # the model's own letter after the stored '['
    assert np.allclose(np.stack(gen["h_dec"].to_numpy()), np.stack(df["h_dec"].to_numpy()), atol=0.05)
    assert np.allclose(np.stack(gen["scores"].to_numpy()), np.stack(df["scores"].to_numpy()), atol=1e-2)
    assert verify_store(root / "gen") == []


def test_generate_first_token_is_the_models_own_identifier(teacher, dumped):
    """Fails if generate mode's first token is not the model's own choice at the decision step: the
    backend must report the token it decoded (not a '[' that teacher-dump adds to the text), and for
    prompts that end with '[' (DESIGN.md point 1) that token is an identifier."""
    _, _, _, df = dumped
    ident = identifier_token_ids(make_scheme("letters", 8), teacher.tokenizer)
    prompts = [teacher.tokenizer.encode(t, add_special_tokens=False) for t in df["prompt"].head(4)]
    out = teacher.run(prompts, ident, "generate", max_new_tokens=2)
    assert np.isin(out.first_ids, ident).all(), teacher.tokenizer.convert_ids_to_tokens(out.first_ids.tolist())
    for text, tok in zip(out.generated, out.first_ids.tolist()):
        assert text.startswith(teacher.tokenizer.decode([tok])) and text[0] in "ABCDEFGH"
    assert out.hit_budget.all()  # two tokens: no answer ends there
    # the same prompts cut before their final '[': the model's own first token is '[', not a decision
    out = teacher.run([p[:-1] for p in prompts], ident, "generate", max_new_tokens=1)
    open_id = teacher.tokenizer.encode("[", add_special_tokens=False)[0]
    assert (out.first_ids == open_id).all() and not np.isin(out.first_ids, ident).any()


def test_cli_store_records_the_dtype_actually_used(tmp_path: Path, monkeypatch):
    """Fails if the store records the requested `auto` (or anything but the loaded weights' dtype)."""
    from pipeline.teacher import hf_backend
    from stages.cli import app

    loaded = []
    init = hf_backend.HFTeacher.__init__

    def spy(self, cfg):
        init(self, cfg)
        loaded.append(self)

    monkeypatch.setattr(hf_backend.HFTeacher, "__init__", spy)
    prepared, candidates = make_inputs(tmp_path / "in", n_users=1, per_user=1)
    result = CliRunner().invoke(app, ["teacher-dump", "--prepared", str(prepared), "--candidates", str(candidates),
                                      "--out", str(tmp_path / "s"), "--dtype", "auto", "--history-len", "2"])
    assert result.exit_code == 0, result.output
    used = str(next(loaded[0].model.parameters()).dtype).removeprefix("torch.")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert used in ("bfloat16", "float32") and manifest["settings"]["teacher"]["dtype"] == used
    assert manifest.get("run", {}).get("backend_dtype", used) == used


def test_cli_teacher_dump_and_cache(tmp_path: Path):
    from stages.cli import app

    prepared, candidates = make_inputs(tmp_path / "in", n_users=2, per_user=1)
    out = tmp_path / "store"
    args = ["teacher-dump", "--prepared", str(prepared), "--candidates", str(candidates), "--out", str(out),
            "--dtype", "float32", "--shard-rows", "1", "--history-len", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 shard(s) written" in " ".join(result.output.split())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 shard(s) written, 2 already complete" in " ".join(again.output.split())
    verified = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert verified.exit_code == 0 and "OK" in verified.output
    df = pl.read_parquet(out / "*.parquet")
    assert df["h_dec"].dtype == pl.Array(pl.Float16, 576) and df["status"].to_list() == ["ok", "ok"]


def test_cli_refuses_a_store_made_with_other_settings(tmp_path: Path, capsys):
    from stages.cli import main

    prepared, candidates = make_inputs(tmp_path / "in", n_users=2, per_user=1)
    base = ["teacher-dump", "--prepared", str(prepared), "--candidates", str(candidates), "--out",
            str(tmp_path / "store"), "--dtype", "float32", "--limit", "1"]
    main(base)
    with pytest.raises(SystemExit) as exc:
        main([*base, "--candidate-order", "retriever"])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "candidate_order: stored 'shuffled', now 'retriever'" in err and "another --out" in err
