"""teacher-tune: its samples (no leakage, uniform target position) and its training loop (learns, resumes, merges).

The loop is tested on tiny random-weight Llama models built from a transformers config, with real peft.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.teacher.tune_data import (build_samples, force_target, position_uniformity_pvalue, shuffle_candidates,
                                split_users, training_prefixes)

K = 4
IDENT = [50, 51, 52, 53]


def random_train(n_users: int = 30, n_items: int = 60, seed: int = 0) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Per-user sequences of distinct items; valid/test are the two items after train (as the split makes them)."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for _ in range(n_users):
        seq = rng.permutation(np.arange(1, n_items + 1))[: int(rng.integers(5, 15))]
        train.append(seq[:-2].astype(np.int32))
        valid.append(int(seq[-2]))
        test.append(int(seq[-1]))
    return train, valid, test


def test_prefixes_never_hold_a_validation_or_test_item():
    """Fails if a prefix reaches past the training sequence (position == len(train): the target would be the
    validation item) or if a history includes its own target."""
    train, valid, test = random_train()
    users, _ = split_users(len(train), 0.2, seed=1)
    us, ps = training_prefixes(train, users)
    assert len(us) == sum(len(train[u]) - 1 for u in users)
    for u, p in zip(us, ps):
        assert 1 <= p < len(train[u])
        history, target = train[u][:p], train[u][p]
        assert target not in (valid[u], test[u])
        assert target not in history
        assert valid[u] not in history and test[u] not in history


def test_user_split_is_disjoint_and_seeded():
    a_tune, a_hold = split_users(100, 0.1, seed=3)
    b_tune, b_hold = split_users(100, 0.1, seed=3)
    assert np.array_equal(a_hold, b_hold) and len(a_hold) == 10
    assert not set(a_tune) & set(a_hold) and len(a_tune) + len(a_hold) == 100
    assert not np.array_equal(split_users(100, 0.1, seed=4)[1], a_hold)


def test_force_target_replaces_the_lowest_candidate_only_when_missing():
    cands = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int32)
    out, forced = force_target(cands, np.array([7, 99]))
    assert out.tolist() == [[5, 6, 7, 8], [9, 10, 11, 99]]
    assert forced.tolist() == [False, True]


def test_target_position_is_uniform_after_the_shuffle():
    """Fails if the candidates are shown in retriever order (the target would sit mostly first) or the
    forced target always last: a chi-square test against uniform over K=20 positions."""
    n, k = 4000, 20
    rng = np.random.default_rng(0)
    cands = np.stack([rng.permutation(np.arange(1, 200))[:k] for _ in range(n)]).astype(np.int32)
    target = cands[:, 0].copy()  # the retriever's best is the target: retriever order would put it at 0
    target[: n // 2] = 500 + np.arange(n // 2)  # half missing: forced into the last slot
    forced, _ = force_target(cands, target)
    shown, tix = shuffle_candidates(forced, target, seed=7)
    assert (shown[np.arange(n), tix] == target).all()
    assert position_uniformity_pvalue(tix, k) > 0.001
    # the unshuffled positions are far from uniform: the test can tell
    unshuffled = np.where(np.arange(n) < n // 2, k - 1, 0)
    assert position_uniformity_pvalue(unshuffled, k) < 1e-6


def test_chi_square_pvalue_matches_known_quantiles():
    """The p-value is computed independently of scipy; check it at textbook 5% critical values."""
    # dof 1: 3.841 -> 0.05; dof 19: 30.144 -> 0.05; dof 3: 7.815 -> 0.05
    for dof, crit in [(1, 3.841459), (19, 30.143527), (3, 7.814728)]:
        k = dof + 1
        # build counts whose chi2 equals crit: all at expected except two cells shifted by d
        n = 10_000 * k
        e = n / k
        d = math.sqrt(crit * e / 2)
        counts = np.full(k, e)
        counts[0] += d
        counts[1] -= d
        # expand counts to indices (rounding changes chi2 slightly; allow for it)
        idx = np.repeat(np.arange(k), np.round(counts).astype(int))
        assert position_uniformity_pvalue(idx, k) == pytest.approx(0.05, abs=0.003)


def test_build_samples_rows_are_consistent():
    train, _, _ = random_train()
    users, positions = training_prefixes(train, np.arange(len(train)))
    rng = np.random.default_rng(1)
    cands = np.stack([rng.permutation(np.arange(100, 200))[:K] for _ in users]).astype(np.int32)
    s = build_samples(train, users, positions, cands, seed=0)
    assert len(s) == len(users) and s.forced.all()  # the candidates never held the target
    for i in range(len(s)):
        assert s.target[i] == train[s.user_idx[i]][s.position[i]]
        assert s.shown[i, s.target_index[i]] == s.target[i]
        assert sorted(s.shown[i].tolist()) == sorted([*cands[i, :-1].tolist(), int(s.target[i])])


# ---- the training loop, on tiny random models -------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def marker_task(n: int, seed: int = 0):
    """The label is written in the prompt as a marker token (40+label) at a varying place: learnable."""
    from pipeline.teacher.tune import TuneExample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lab = int(rng.integers(K))
        ids = [*rng.integers(1, 30, size=int(rng.integers(3, 7))).tolist(), 40 + lab,
               *rng.integers(1, 30, size=3).tolist(), 63]
        out.append(TuneExample([int(i) for i in ids], lab))
    return out


def test_the_machinery_learns_a_learnable_task(tmp_path: Path):
    """Fails if the loss is not at the decision position or not over the identifier logits (it would stay
    at ln K): within 60 steps the loss falls well below ln K and held-out accuracy is far above 1/K."""
    from pipeline.teacher.tune import TuneConfig, apply_method, score_examples, train

    cfg = TuneConfig(method="full", lr=3e-3, batch_size=16, warmup_ratio=0.1, checkpoint_every=1000)
    model = apply_method(tiny_llama(), cfg)
    state = train(model, marker_task(960), IDENT, 0, cfg, tmp_path, "fp")
    assert state.step == 60 and state.stopped == "done"
    assert np.mean(state.losses[:3]) == pytest.approx(math.log(K), abs=0.1)
    assert np.mean(state.losses[-5:]) < 0.3 * math.log(K)
    held = marker_task(200, seed=9)
    acc = (score_examples(model, held, IDENT, 0).argmax(1) == [e.label for e in held]).mean()
    assert acc > 0.8


def test_lora_learns_and_trains_only_the_adapter(tmp_path: Path):
    from pipeline.teacher.tune import TuneConfig, apply_method, train

    cfg = TuneConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=1e-2, batch_size=16,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), checkpoint_every=1000)
    base = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_method(base, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    state = train(model, marker_task(960), IDENT, 0, cfg, tmp_path, "fp")
    assert np.mean(state.losses[-5:]) < 0.6 * math.log(K)
    for n, p in model.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace("base_layer.", "")
            assert torch.equal(p, frozen[key]), n


def test_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path: Path):
    """Fails if the checkpoint drops the optimizer moments, the loop position or the dropout seeds: the
    resumed weights would differ from the uninterrupted run's."""
    from pipeline.teacher.tune import TuneConfig, apply_method, train

    cfg = TuneConfig(method="lora", lr=5e-3, batch_size=8, grad_accum=2, checkpoint_every=3, lora_dropout=0.1)
    data = marker_task(160)
    full = apply_method(tiny_llama(), cfg)
    train(full, data, IDENT, 0, cfg, tmp_path / "a", "fp")

    class Killed(Exception):
        pass

    def kill_at_step_7(state, total):  # after step 7; the last checkpoint is step 6's
        if state.step == 7:
            raise Killed

    first = apply_method(tiny_llama(), cfg)
    with pytest.raises(Killed):
        train(first, data, IDENT, 0, cfg, tmp_path / "b", "fp", progress=kill_at_step_7)
    resumed = apply_method(tiny_llama(), cfg)  # a fresh process: fresh model, then the checkpoint
    state = train(resumed, data, IDENT, 0, cfg, tmp_path / "b", "fp")
    assert state.step == 10
    a = dict(full.named_parameters())
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, a[n], atol=1e-6), n


def test_checkpoint_of_other_settings_is_refused(tmp_path: Path):
    from pipeline.errors import UsageError
    from pipeline.teacher.tune import TuneConfig, apply_method, train

    cfg = TuneConfig(method="lora", lr=5e-3, batch_size=8, checkpoint_every=1)
    train(apply_method(tiny_llama(), cfg), marker_task(16), IDENT, 0, cfg, tmp_path, "fp-one")
    with pytest.raises(UsageError, match="other settings"):
        train(apply_method(tiny_llama(), cfg), marker_task(16), IDENT, 0, cfg, tmp_path, "fp-two")


def test_merged_model_gives_the_adapters_decision_logits(tmp_path: Path):
    """The merged directory that teacher-dump loads must score exactly as base + adapter."""
    from transformers import AutoModelForCausalLM

    from pipeline.teacher.tune import TuneConfig, apply_method, left_pad, decision_logits, train

    cfg = TuneConfig(method="lora", lr=1e-2, batch_size=8, checkpoint_every=1000, lora_dropout=0.0)
    model = apply_method(tiny_llama(), cfg)
    data = marker_task(64)
    train(model, data, IDENT, 0, cfg, tmp_path / "run", "fp")
    ids, mask, pos = left_pad([e.input_ids for e in data[:16]], 0, torch.device("cpu"))
    with torch.no_grad():
        adapter = decision_logits(model, ids, mask, pos, IDENT)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        again = decision_logits(loaded, ids, mask, pos, IDENT)
    assert torch.allclose(adapter, again, atol=1e-4)
    assert (adapter.argmax(1) == again.argmax(1)).all()


# ---- run_tune end to end, with the real embedded teacher -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tune_inputs(tmp_path_factory):
    """Prepared data with real movie titles and an (untrained) retriever checkpoint over it."""
    from pipeline.student.checkpoint import save_student
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig
    from tests.teacher_fixtures import make_inputs

    root = tmp_path_factory.mktemp("tune")
    prepared, _ = make_inputs(root / "in", n_users=6, k=4)
    data = load_prepared(prepared)
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, n_blocks=1, n_heads=1, inner=32, max_len=10))
    save_student(root / "student", model, {"prepared_fingerprint": data.fingerprint})
    return prepared, root / "student", data


@pytest.mark.teacher
@pytest.mark.slow
def test_run_tune_writes_a_merged_teacher_that_dump_loads(tiny_tune_inputs, tmp_path):
    """teacher-tune on the real embedded teacher: a few LoRA steps with teacher-dump's prompt; the merged
    directory loads in the HF backend, identifies as a different teacher than the base, and a rerun resumes
    from the finished checkpoint without training again."""
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.tune import TuneConfig
    from pipeline.teacher.tune_run import TuneRunConfig, run_tune

    prepared, student, data = tiny_tune_inputs
    cfg = TuneRunConfig(k=4, history_len=3, holdout_fraction=0.34, n_boot=200, dtype="float32",
                        tune=TuneConfig(lr=1e-3, batch_size=4, max_samples=8, top_layers=2, checkpoint_every=1))
    out = tmp_path / "tuned"
    r = run_tune(cfg, prepared, student, out)
    assert r["training"]["steps"] == 2 and r["training"]["stopped"] == "done"
    assert r["samples"]["holdout_users"] == 2 and r["samples"]["tune_users"] == 4
    from pipeline.teacher.tune_data import split_users

    tune_users, _ = split_users(6, 0.34, 0)
    assert r["samples"]["prefixes"] == sum(len(data.train[u]) - 1 for u in tune_users)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "config.json").exists() and (out / "checkpoint" / "state.json").exists()
    ev = r["evaluation"]
    assert set(ev["metrics"]) == {"tuned", "zero-shot", "popularity", "student"}
    for m in ev["metrics"].values():
        assert 0.0 <= m["hr@1"] <= m["hr@5"] <= 1.0
    base = resolve_teacher("embedded")
    merged = resolve_teacher(str(out / "merged"))
    assert merged.revision != base.revision

    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    t = HFTeacher(HFConfig(str(out / "merged"), dtype="float32"))
    assert t.hidden_size == 576
    again = run_tune(cfg, prepared, student, out)
    assert again["training"]["steps"] == 2  # resumed from the finished checkpoint: no extra steps
    assert again["teacher"]["merged_weights_sha256"] == r["teacher"]["merged_weights_sha256"]


def test_decision_logits_are_float32_under_bf16_autocast():
    """Fails if the identifier logits follow autocast into bfloat16 (numpy cannot take them, and the loss
    would be computed on 8-bit mantissas): the bf16 CPU profile crashed at its first evaluation."""
    from pipeline.teacher.tune import decision_logits, left_pad, score_examples

    model = tiny_llama().eval()
    data = marker_task(4)
    ids, mask, pos = left_pad([e.input_ids for e in data], 0, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = decision_logits(model, ids, mask, pos, IDENT)
        arr = score_examples(model, data, IDENT, 0)
    assert s.dtype == torch.float32 and arr.dtype == np.float32 and arr.shape == (4, K)


def test_installed_teacher_tune_refuses_missing_inputs_with_exit_2(tmp_path: Path):
    """Through the installed command: a missing prepared folder is a usage error (exit 2, what to do), not a
    traceback, and nothing is written to --out."""
    from tests.test_entrypoint import run_gedistill

    r = run_gedistill("teacher-tune", "--prepared", str(tmp_path / "nope"), "--student", str(tmp_path / "s"),
                      "--out", str(tmp_path / "tuned"))
    assert r.returncode == 2, r.stderr
    assert "prepare" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tuned").exists()


def test_lora_learns_under_bf16_and_the_tuned_scores_move(tmp_path: Path):
    """Fails if bf16 autocast spans optimizer steps (one region around the loop): autocast caches each weight's
    bf16 copy, the forward never sees the updated LoRA weights (B stays zero), the loss stays at ln K and the
    'tuned' scores equal the zero-shot ones exactly. The first CPU profile run on ML-100K did exactly that."""
    from pipeline.teacher.tune import TuneConfig, apply_method, score_examples, train

    cfg = TuneConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=1e-2, batch_size=16,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), checkpoint_every=1000)
    model, held = tiny_llama(), marker_task(50, seed=3)
    bf16 = torch.bfloat16
    zero = score_examples(model, held, IDENT, 0, compute_dtype=bf16)
    wrapped = apply_method(model, cfg)
    state = train(wrapped, marker_task(960), IDENT, 0, cfg, tmp_path, "fp", compute_dtype=bf16)
    tuned = score_examples(wrapped, held, IDENT, 0, compute_dtype=bf16)
    assert np.mean(state.losses[-5:]) < 0.6 * math.log(K)
    assert np.abs(tuned - zero).max() > 0.1
