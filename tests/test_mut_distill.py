"""The distillation objective's checks, where mutation testing found the suite blind
(docs/MUTATION.md): config bounds and messages, the row-against-training check that stops leakage,
and the per-position mean scores of --calibrate, on hand-made Parquet files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.student.distill import DistillConfig, check_rows_against_training, position_mean_scores
from pipeline.errors import UsageError

TRAIN = [np.array([5, 6, 7, 8]), np.array([9, 10, 11])]
PREPARED = SimpleNamespace(train=TRAIN)


def _rows_file(path: Path, rows: list[tuple[int, int, int, int]]) -> Path:
    sid, u, p, t = (list(c) for c in zip(*rows))
    pq.write_table(pa.table({"sample_id": pa.array(sid, pa.int64()), "user_idx": pa.array(u, pa.int32()),
                             "position": pa.array(p, pa.int32()), "target": pa.array(t, pa.int32())}), path)
    return path


def test_rows_that_are_training_prefixes_pass(tmp_path: Path):
    """Fails if a valid row (position 1..len-1, target = train[u][p]) is refused."""
    check_rows_against_training([_rows_file(tmp_path / "a.parquet", [(0, 0, 1, 6), (1, 0, 3, 8), (2, 1, 2, 11)])],
                                PREPARED)


@pytest.mark.parametrize("row, why", [
    ((7, 0, 4, 99), "position 4 is not before the end of user 0's training sequence (length 4): its target or "
                    "history would include the validation item (leakage)"),
    ((7, 1, 5, 99), "position 5 is not before the end of user 1's training sequence (length 3): its target or "
                    "history would include the validation item (leakage)"),
    ((7, 2, 1, 6), "(user_idx 2, position 1, target 6) is not an item of the training sequences"),
    ((7, -1, 1, 6), "(user_idx -1, position 1, target 6) is not an item of the training sequences"),
    ((7, 0, -1, 8), "(user_idx 0, position -1, target 8) is not an item of the training sequences"),
    ((7, 0, 2, 6), "(user_idx 0, position 2, target 6) is not an item of the training sequences"),
])
def test_a_row_outside_the_training_prefixes_is_refused_by_name(tmp_path: Path, row, why):
    """Fails if a row at or past the end of the training sequence (leakage), of an unknown user, at a
    negative position or with the wrong target passes, or if the message stops naming the shard, the
    sample and the reason."""
    path = _rows_file(tmp_path / "s.parquet", [(0, 0, 1, 6), row, (9, 1, 1, 10)])
    with pytest.raises(UsageError) as e:
        check_rows_against_training([_rows_file(tmp_path / "ok.parquet", [(0, 0, 1, 6)]), path], PREPARED)
    assert str(e.value) == (f"{path}: teacher sample 7 {why}. The store was made from other prepared data or by a "
                            "broken sampler; rerun `gedistill retrieve` and `gedistill teacher-dump` on this data")


def test_the_first_bad_row_is_named(tmp_path: Path):
    """Fails if the message names a later bad row than the first."""
    path = _rows_file(tmp_path / "s.parquet", [(0, 0, 1, 6), (3, 0, 2, 5), (4, 0, 9, 5)])
    with pytest.raises(UsageError, match="teacher sample 3 "):
        check_rows_against_training([path], PREPARED)


def _scores_file(path: Path, scores: list[list[float]], status: list[str]) -> Path:
    pq.write_table(pa.table({"scores": pa.array(scores, pa.list_(pa.float32())), "status": status}), path)
    return path


def test_position_means_skip_failed_rows_across_shards(tmp_path: Path):
    """Fails if failed rows are averaged in, a shard is skipped, or the mean is not per position shown."""
    a = _scores_file(tmp_path / "a.parquet", [[1.0, 2.0, 3.0], [100.0, 100.0, 100.0]], ["ok", "failed"])
    b = _scores_file(tmp_path / "b.parquet", [[3.0, 0.0, -1.0], [2.0, 1.0, 1.0]], ["repaired", "ok"])
    means = position_mean_scores([a, b])
    assert means.dtype == np.float32
    np.testing.assert_allclose(means, [2.0, 1.0, 1.0])


def test_position_means_need_a_usable_row(tmp_path: Path):
    """Fails if a store whose rows all failed gives NaN means instead of a message."""
    a = _scores_file(tmp_path / "a.parquet", [[1.0, 2.0]], ["failed"])
    with pytest.raises(UsageError, match=r"^--calibrate needs identifier scores, and the store has no usable rows$"):
        position_mean_scores([a])


def test_config_defaults():
    """Fails if a default of the objective changes silently (params.yaml and the README rely on them)."""
    c = DistillConfig()
    assert (c.w_rank, c.lambda_emb, c.emb_loss, c.target, c.temperature) == (1.0, 1.0, "cosine", "ranking", 1.0)
    assert (c.gamma_position, c.gamma_confidence, c.gamma_agreement, c.position_beta, c.agreement_k) == (0, 0, 0, 5.0, 5)
    assert (c.teacher_batch_size, c.buffer_rows, c.skip_failed, c.calibrate, c.init, c.seed) == (
        32, 4096, True, False, "scratch", 0)


@pytest.mark.parametrize("kw", [dict(w_rank=0.0), dict(lambda_emb=0.0), dict(emb_loss="mse"),
                                dict(emb_loss="standardized"), dict(target="scores"), dict(init="baseline"),
                                dict(gamma_position=0.5, gamma_confidence=0.25, gamma_agreement=0.25),
                                dict(teacher_batch_size=2, buffer_rows=2), dict(temperature=0.01)])
def test_config_accepts_its_bounds(kw):
    """Fails if a value at the edge of what is allowed (a zero weight, gammas summing to exactly 1,
    a batch of 2 filling the buffer) is refused."""
    DistillConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(w_rank=-0.1), "w_rank and lambda_emb must be >= 0"),
    (dict(lambda_emb=-0.1), "w_rank and lambda_emb must be >= 0"),
    (dict(emb_loss="l1"), "emb_loss must be mse, cosine or standardized, not 'l1'"),
    (dict(target="logits"), "target must be ranking or scores, not 'logits'"),
    (dict(init="random"), "init must be scratch or baseline, not 'random'"),
    (dict(temperature=0.0), "the teacher temperature must be > 0"),
    (dict(gamma_position=-0.1), "importance gammas (position, confidence, agreement) must be >= 0 and sum to <= 1"),
    (dict(gamma_confidence=-0.1), "importance gammas (position, confidence, agreement) must be >= 0 and sum to <= 1"),
    (dict(gamma_agreement=-0.1), "importance gammas (position, confidence, agreement) must be >= 0 and sum to <= 1"),
    (dict(gamma_position=0.6, gamma_agreement=0.5),
     "importance gammas (position, confidence, agreement) must be >= 0 and sum to <= 1"),
    (dict(teacher_batch_size=1, buffer_rows=1), "need 2 <= teacher_batch_size <= buffer_rows"),
    (dict(teacher_batch_size=8, buffer_rows=7), "need 2 <= teacher_batch_size <= buffer_rows"),
])
def test_config_refuses_what_it_cannot_train_with(kw, message):
    """Fails if a bad objective setting reaches training instead of a usage error saying what is allowed."""
    with pytest.raises(UsageError) as e:
        DistillConfig(**kw)
    assert str(e.value) == message


# ---------------------------------------------------------------- the objective on a hand-made store

import torch  # noqa: E402

from pipeline.student.distill import DistillObjective, open_teacher_store  # noqa: E402
from pipeline.data.prepared import load_prepared  # noqa: E402
from pipeline.student.sasrec import SASRec, SasrecConfig  # noqa: E402
from pipeline.data.sequences import left_pad  # noqa: E402
from tests.distill_helpers import cluster_world, hand_rows, write_teacher_store, write_world  # noqa: E402

ROWS = [{"user_idx": 0, "position": 3, "candidates": [1, 2, 3], "ranking": [2, 0, 1], "scores": [0.1, 0.2, 0.9]},
        {"user_idx": 1, "position": 4, "candidates": [4, 5, 6], "ranking": [0, 1, 2], "scores": [0.5, 0.3, 0.1]},
        {"user_idx": 2, "position": 5, "candidates": [7, 8, 9], "ranking": [1, 2, 0], "scores": [0.0, 0.8, 0.4]}]


def _objective(tmp_path: Path, rows, **cfg):
    world = cluster_world(n_users=6, length=8, n_items=20, n_clusters=4, seed=0)
    write_world(tmp_path / "prepared", world)
    prepared = load_prepared(tmp_path / "prepared")
    write_teacher_store(tmp_path / "store", hand_rows(world["train"], rows), prepared_fingerprint=prepared.fingerprint)
    shards = list(open_teacher_store(tmp_path / "store", prepared).shard_paths)
    cfg = {"teacher_batch_size": len(rows), "buffer_rows": len(rows), **cfg}
    return DistillObjective(DistillConfig(**cfg), prepared, shards, 8, 8), prepared


def test_logs_are_the_documented_collapse_check(tmp_path: Path):
    """Fails if a logged name changes or u_norm is not the mean per-user norm of u_sas (the collapse
    check reads these numbers every step)."""
    obj, prepared = _objective(tmp_path, ROWS)
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    _, logs = obj.loss(model, 0)
    assert set(logs) == {"l_rank", "l_emb", "u_norm", "proj_norm", "u_spread", "proj_spread"}
    hist = left_pad([prepared.train[r["user_idx"]][max(0, r["position"] - 8):r["position"]] for r in ROWS], 8)
    with torch.no_grad():
        u = model.user_embedding(hist)
    assert logs["u_norm"] == pytest.approx(float(u.norm(dim=1).mean()), rel=1e-5)
    assert logs["u_spread"] == pytest.approx(float(u.std(dim=0).mean()), rel=1e-5)



def test_end_epoch_means_are_per_step(tmp_path: Path):
    """Fails if end_epoch divides the summed logs by anything but the number of steps taken."""
    obj, _ = _objective(tmp_path, ROWS)
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    seen = [obj.loss(model, step)[1]["l_emb"] for step in range(2)]
    assert obj.end_epoch()["l_emb"] == pytest.approx(sum(seen) / 2, rel=1e-6)


def test_projector_starts_like_a_linear_layer(tmp_path: Path):
    """Fails if the seeded projector init leaves U(-1/sqrt(H), 1/sqrt(H)) for the weight or the bias."""
    obj, _ = _objective(tmp_path, ROWS)
    bound = 1 / np.sqrt(obj.teacher_width)
    for p in (obj.projector.weight.detach(), obj.projector.bias.detach()):
        assert float(p.abs().max()) <= bound and float(p.min()) < 0 < float(p.max())


def test_matching_candidates_are_accepted_and_a_mismatch_says_what_to_pass(tmp_path: Path):
    """Fails if a store made from the given candidates file is refused (the fingerprint read from the
    wrong settings key), or the refusal of other data stops saying what to pass."""
    from pipeline.data.candidates import write_candidates

    world = cluster_world(n_users=6, length=8, n_items=20, n_clusters=4, seed=0)
    write_world(tmp_path / "prepared", world)
    prepared = load_prepared(tmp_path / "prepared")
    cands = tmp_path / "candidates.parquet"
    fp = write_candidates(cands, np.array([0]), np.array([3]), np.array([world["train"][0][3]]),
                          np.array([[1, 2, 3]]), np.zeros((1, 3), np.float32), {"prepared_fingerprint": "x"})
    write_teacher_store(tmp_path / "store", hand_rows(world["train"], ROWS[:1]),
                        prepared_fingerprint=prepared.fingerprint, candidates_fingerprint=fp)
    assert open_teacher_store(tmp_path / "store", prepared, candidates=cands).n_rows == 1
    other = SimpleNamespace(fingerprint="f" * 64, train=prepared.train)
    with pytest.raises(UsageError) as e:
        open_teacher_store(tmp_path / "store", other)
    assert str(e.value).endswith(". Pass the --prepared (and --candidates) it was made from, or rerun "
                                 "`gedistill teacher-dump` on this data.")


def test_a_bad_user_in_a_one_user_dataset_is_named(tmp_path: Path):
    """Fails if a row naming a user that does not exist crashes (IndexError) instead of being refused."""
    path = _rows_file(tmp_path / "s.parquet", [(0, 3, 1, 6)])
    with pytest.raises(UsageError, match=r"teacher sample 0 \(user_idx 3, position 1, target 6\) is not an item"):
        check_rows_against_training([path], SimpleNamespace(train=[np.array([5, 6, 7])]))


# ---------------------------------------------------------------- the full mutation run of 2026-12-01
# (docs/MUTATION.md, note 14): every mutant of distill.py, where the earlier sample of 80 had hidden these holes.

from pipeline.student.checkpoint import save_student  # noqa: E402
from pipeline.student.distill import init_from_baseline  # noqa: E402
from pipeline.student.losses_distill import (  # noqa: E402
    embedding_loss, importance_weights, listnet_loss, ranks_from_ranking, teacher_distribution)
from pipeline.student.teacher_stream import TeacherBatch, TeacherStream  # noqa: E402

REFUSE_TAIL = ("The store was made from other prepared data or by a broken sampler; rerun `gedistill retrieve` "
               "and `gedistill teacher-dump` on this data")


def test_an_empty_training_set_refuses_every_row_by_name(tmp_path: Path):
    """Fails if prepared data without training sequences crashes on a store's row (an IndexError, as before
    2026-12-01) instead of refusing it, or refuses a store without rows."""
    check_rows_against_training([_empty_rows_file(tmp_path / "empty.parquet")], SimpleNamespace(train=[]))
    path = _rows_file(tmp_path / "s.parquet", [(4, 0, 1, 6)])
    with pytest.raises(UsageError) as e:
        check_rows_against_training([path], SimpleNamespace(train=[]))
    assert str(e.value) == (f"{path}: teacher sample 4 (user_idx 0, position 1, target 6) is not an item of the "
                            f"training sequences. {REFUSE_TAIL}")


def _empty_rows_file(path: Path) -> Path:
    pq.write_table(pa.table({"sample_id": pa.array([], pa.int64()), "user_idx": pa.array([], pa.int32()),
                             "position": pa.array([], pa.int32()), "target": pa.array([], pa.int32())}), path)
    return path


def test_a_position_zero_row_passes_but_its_target_is_checked(tmp_path: Path):
    """Position 0 (an empty history) is a training prefix: the stream drops it, the check must not refuse
    it. Fails if it is refused, or if its target goes unchecked (a wrong item at position 0 passing)."""
    check_rows_against_training([_rows_file(tmp_path / "a.parquet", [(0, 0, 0, 5), (1, 1, 0, 9)])], PREPARED)
    path = _rows_file(tmp_path / "b.parquet", [(0, 0, 0, 5), (1, 1, 0, 10)])
    with pytest.raises(UsageError) as e:
        check_rows_against_training([path], PREPARED)
    assert str(e.value) == (f"{path}: teacher sample 1 (user_idx 1, position 0, target 10) is not an item of the "
                            f"training sequences. {REFUSE_TAIL}")


def test_the_row_check_and_the_calibration_read_only_their_columns(tmp_path: Path, monkeypatch):
    """Fails if the row check or --calibrate's means read whole shards (h_dec is most of a store's bytes)."""
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"sample_id": pa.array([0], pa.int64()), "user_idx": pa.array([0], pa.int32()),
                             "position": pa.array([1], pa.int32()), "target": pa.array([6], pa.int32()),
                             "scores": pa.array([[1.0, 2.0]], pa.list_(pa.float32())), "status": ["ok"],
                             "h_dec": pa.array([[0.5] * 4], pa.list_(pa.float32(), 4))}), path)
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        asked.append(kw.get("columns"))
        return real(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    check_rows_against_training([path], PREPARED)
    np.testing.assert_allclose(position_mean_scores([path]), [1.0, 2.0])
    assert asked == [["sample_id", "user_idx", "position", "target"], ["scores", "status"]]


def test_a_store_whose_shard_bytes_changed_is_refused_before_training(tmp_path: Path):
    """Fails if student-train's opening of a store skips the sha256 of its shards (a flipped byte of the
    same size would then train silently on altered h_dec)."""
    obj, prepared = _objective(tmp_path, ROWS)
    shard = obj.stream.shards[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match=r"fails verification, refusing to use it .*" + shard.name):
        open_teacher_store(tmp_path / "store", prepared)


def test_the_refusal_of_other_data_names_both_fingerprints(tmp_path: Path):
    """Fails if the message stops showing 16 characters of each fingerprint on both sides, or joins the
    differences otherwise."""
    from pipeline.data.candidates import candidates_fingerprint, write_candidates

    world = cluster_world(n_users=6, length=8, n_items=20, n_clusters=4, seed=0)
    prepared = load_prepared(write_world(tmp_path / "prepared", world))
    root = write_teacher_store(tmp_path / "store", hand_rows(world["train"], ROWS),
                               prepared_fingerprint=prepared.fingerprint, candidates_fingerprint="c" * 64)
    cands = tmp_path / "candidates.parquet"
    write_candidates(cands, np.array([0]), np.array([3]), np.array([prepared.train[0][3]]),
                     np.array([[1, 2, 3]]), np.zeros((1, 3), np.float32), {"prepared_fingerprint": "x"})
    fp = candidates_fingerprint(cands)
    other = SimpleNamespace(fingerprint="0123456789abcdef" + "9" * 48, train=prepared.train)
    with pytest.raises(UsageError) as e:
        open_teacher_store(root, other, candidates=cands)
    assert str(e.value) == (
        f"{root} was made from other data than this training run uses: prepared-data fingerprint: store "
        f"{prepared.fingerprint[:16]}, training data 0123456789abcdef; candidates fingerprint: store {'c' * 16}, "
        f"{cands} {fp[:16]}. Pass the --prepared (and --candidates) it was made from, or rerun "
        "`gedistill teacher-dump` on this data.")


def test_init_from_baseline_refusals_say_what_differs(tmp_path: Path):
    """Fails if a baseline of other data loses its message, or several architecture differences are not
    listed joined by '; '."""
    base = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8))
    save_student(tmp_path / "b", base, {"prepared_fingerprint": "p" * 64})
    with pytest.raises(UsageError) as e:
        init_from_baseline(base, tmp_path / "b", SimpleNamespace(fingerprint="q" * 64))
    assert str(e.value) == (f"{tmp_path / 'b'}: the baseline was trained on other prepared data; retrain it or use "
                            "--init scratch")
    other = SASRec(SasrecConfig(n_items=20, hidden=16, n_heads=2, inner=32, max_len=8))
    with pytest.raises(UsageError) as e:
        init_from_baseline(other, tmp_path / "b", SimpleNamespace(fingerprint="p" * 64))
    assert str(e.value) == (f"{tmp_path / 'b'}: the baseline's architecture differs (hidden: baseline 8, now 16; "
                            "inner: baseline 16, now 32); match it or use --init scratch")


TWELVE = [{"user_idx": u, "position": p, "candidates": [1, 2, 3], "ranking": [0, 1, 2], "scores": [0.3, 0.2, 0.1],
           "status": "failed" if (u, p) == (2, 5) else "ok"} for u in range(6) for p in (2, 5)]


def _sample_ids(batches, n):
    return [next(batches).sample_id.tolist() for _ in range(n)]


def test_the_objective_streams_with_its_seed_buffer_and_failed_row_setting(tmp_path: Path):
    """Fails if DistillConfig's seed, buffer_rows or skip_failed do not reach the teacher stream: the
    objective's batches must be those of a TeacherStream built with the same three settings."""
    obj, _ = _objective(tmp_path, TWELVE, teacher_batch_size=2, buffer_rows=4, seed=3)
    shards = obj.stream.shards
    want = _sample_ids(iter(TeacherStream(shards, 2, buffer_rows=4, seed=3)), 11)
    assert _sample_ids(obj._batches, 11) == want
    assert want != _sample_ids(iter(TeacherStream(shards, 2, buffer_rows=4, seed=0)), 11)
    assert want != _sample_ids(iter(TeacherStream(shards, 2, buffer_rows=4096, seed=3)), 11)
    failed = 5  # sample id of (user 2, position 5)
    assert failed not in sum(want, [])
    keep, _ = _objective(tmp_path / "keep", TWELVE, teacher_batch_size=2, buffer_rows=4, seed=3, skip_failed=False)
    assert failed in sum(_sample_ids(keep._batches, 6), [])


def _train_model():
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8, dropout=0.5)).train()


def test_the_teacher_pass_draws_dropout_from_its_own_seeded_generator(tmp_path: Path):
    """train.fit runs loss() in a second thread because it draws no number from torch's default generator
    (own_rng). Fails if the teacher pass uses the default generator, or its generator is not seeded by
    DistillConfig.seed (two runs with one seed would then differ)."""
    values = []
    for run in range(2):
        obj, _ = _objective(tmp_path / str(run), ROWS, seed=7)
        model = _train_model()
        torch.manual_seed(100 + run)  # the global generator differs between the runs
        state = torch.get_rng_state()
        values.append([float(obj.loss(model, step)[0].detach()) for step in range(3)])
        assert torch.equal(torch.get_rng_state(), state)
    assert values[0] == values[1]
    obj, _ = _objective(tmp_path / "eval", ROWS, seed=7)
    model = _train_model().eval()
    assert [float(obj.loss(model, step)[0].detach()) for step in range(3)] != values[0]  # dropout was at work


def test_a_zero_weight_leaves_its_loss_out_of_the_graph(tmp_path: Path):
    """Fails if w_rank=0 still computes and logs the ranking loss, or lambda_emb=0 still puts the embedding
    loss into the graph (the projector would then get zero gradients, and weight decay and Adam steps)."""
    obj, _ = _objective(tmp_path / "a", ROWS, w_rank=0.0)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    total, logs = obj.loss(model, 0)
    assert "l_rank" not in logs and float(total.detach()) == pytest.approx(logs["l_emb"], rel=1e-6)
    obj, _ = _objective(tmp_path / "b", ROWS, lambda_emb=0.0)
    total, logs = obj.loss(model, 0)
    total.backward()
    assert obj.projector.weight.grad is None and float(total.detach()) == pytest.approx(logs["l_rank"], rel=1e-6)


def test_the_importance_weights_get_every_setting(tmp_path: Path):
    """Fails if loss() drops or replaces a DLLM2Rec setting (gamma_position, gamma_agreement, position_beta,
    agreement_k) or the student scores on its way to importance_weights: the total must equal the one
    computed here from the module's functions."""
    cfg = dict(gamma_position=0.3, gamma_agreement=0.4, position_beta=2.0, agreement_k=2, w_rank=0.7,
               lambda_emb=0.5, seed=1)
    obj, prepared = _objective(tmp_path, ROWS, **cfg)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    b = next(iter(TeacherStream(obj.stream.shards, 3, buffer_rows=3, seed=1)))
    total, _ = obj.loss(model, 0)
    with torch.no_grad():
        u = model.user_embedding(obj._histories(b))
        s = model.score_items(u, torch.from_numpy(b.candidates))
        ranks = ranks_from_ranking(torch.from_numpy(b.ranking))
        q = teacher_distribution(ranks, torch.from_numpy(b.scores), "ranking", 1.0)
        w = importance_weights(ranks, q, s, gamma_position=0.3, gamma_confidence=0.0, gamma_agreement=0.4,
                               position_beta=2.0, agreement_k=2)
        default_w = importance_weights(ranks, q, s)
        want = 0.7 * listnet_loss(s, q, w) + 0.5 * embedding_loss(obj.projector(torch.from_numpy(b.h_dec)), u, "cosine")
    assert not torch.allclose(w, default_w)
    assert float(total.detach()) == pytest.approx(float(want), rel=1e-5)


def _batch(rows, k=3, scores=True):
    n = len(rows)
    return TeacherBatch(
        sample_id=np.arange(n), user_idx=np.array([r[0] for r in rows]), position=np.array([r[1] for r in rows]),
        target=np.array([r[2] for r in rows]), candidates=np.tile(np.arange(1, k + 1), (n, 1)),
        ranking=np.tile(np.arange(k), (n, 1)),
        scores=np.tile(np.array([0.5, 2.0, -1.0], np.float32), (n, 1)) if scores else np.zeros((n, 0), np.float32),
        h_dec=np.zeros((n, 4), np.float32))


NO_SCORES = ("the teacher store holds no identifier scores, which --calibrate, --teacher-target scores and "
             "--gamma-confidence need; use the defaults or a store with scores")


@pytest.mark.parametrize("cfg", [dict(calibrate=True), dict(target="scores"), dict(gamma_confidence=0.5)])
def test_settings_that_need_scores_refuse_a_batch_without_them(tmp_path: Path, cfg):
    """Fails if --calibrate, --teacher-target scores or --gamma-confidence (even under 1) go on without the
    teacher's scores, or the refusal stops naming them."""
    obj, prepared = _objective(tmp_path, ROWS, **cfg)
    t = prepared.train
    with pytest.raises(UsageError) as e:
        obj.targets(_batch([(0, 3, int(t[0][3]))], scores=False))
    assert str(e.value) == NO_SCORES


def test_the_default_target_needs_no_scores(tmp_path: Path):
    """Fails if the default objective (ranking target, no calibration, gamma_confidence 0) refuses a store
    without scores."""
    obj, prepared = _objective(tmp_path, ROWS)
    ranks, q, conf = obj.targets(_batch([(0, 3, int(prepared.train[0][3]))], scores=False))
    assert conf is None
    torch.testing.assert_close(q, teacher_distribution(ranks, None, "ranking", 1.0))


def test_the_confidence_weight_divides_the_scores_by_the_temperature(tmp_path: Path):
    """Fails if the teacher's confidence is not softmax(score / T) at T != 1."""
    obj, prepared = _objective(tmp_path, ROWS, gamma_confidence=0.5, temperature=2.0)
    _, _, conf = obj.targets(_batch([(0, 3, int(prepared.train[0][3]))]))
    torch.testing.assert_close(conf, torch.softmax(torch.tensor([[0.25, 1.0, -0.5]]), dim=1))


HIST_REFUSAL = ("teacher sample 0 (user_idx {u}, position {p}, target {t}) does not match the prepared training "
                "sequences: the store was made from other prepared data")


def test_histories_refuse_a_row_that_is_not_a_training_prefix(tmp_path: Path):
    """The defence behind check_rows_against_training. Fails if a row of an unknown user (past the end, or
    a negative index that Python would read as the last user), at the end of a sequence, or with another
    target is turned into a history instead of a refusal naming the row."""
    obj, prepared = _objective(tmp_path, ROWS)
    t = prepared.train
    last = len(t) - 1
    for u, p, tgt in [(len(t), 1, 1), (-1, 2, int(t[last][2])), (0, len(t[0]), 1), (0, 2, int(t[0][2]) % 20 + 1)]:
        with pytest.raises(UsageError) as e:
            obj._histories(_batch([(u, p, tgt)]))
        assert str(e.value) == HIST_REFUSAL.format(u=u, p=p, t=tgt)
    hist = obj._histories(_batch([(1, 3, int(t[1][3]))]))
    assert hist.tolist() == [[0] * 5 + [int(x) for x in t[1][:3]]]


def test_end_epoch_restarts_its_means_and_reports_the_store_passes(tmp_path: Path):
    """Fails if end_epoch does not restart its step count (the second epoch's mean would be divided by
    too many steps), mis-divides a one-step epoch, or renames teacher_passes."""
    obj, _ = _objective(tmp_path, ROWS)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    first = [obj.loss(model, s)[1]["l_emb"] for s in range(2)]
    e1 = obj.end_epoch()
    assert e1["l_emb"] == pytest.approx(sum(first) / 2, rel=1e-6) and e1["teacher_passes"] == 2.0
    one = obj.loss(model, 2)[1]["l_emb"]
    e2 = obj.end_epoch()
    assert e2["l_emb"] == pytest.approx(one, rel=1e-6) and e2["teacher_passes"] == 3.0


def test_the_projection_side_of_the_collapse_check(tmp_path: Path):
    """Fails if proj_norm is not the mean per-row norm of W_p h_dec, or proj_spread not its mean
    per-feature standard deviation over the batch."""
    obj, _ = _objective(tmp_path, ROWS, seed=2)
    model = SASRec(SasrecConfig(n_items=20, hidden=8, n_heads=2, inner=16, max_len=8)).eval()
    b = next(iter(TeacherStream(obj.stream.shards, 3, buffer_rows=3, seed=2)))
    _, logs = obj.loss(model, 0)
    with torch.no_grad():
        proj = obj.projector(torch.from_numpy(b.h_dec))
    assert logs["proj_norm"] == pytest.approx(float(proj.norm(dim=1).mean()), rel=1e-5)
    assert logs["proj_spread"] == pytest.approx(float(proj.std(dim=0).mean()), rel=1e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(calibrate=True, gamma_confidence=0.5)])
def test_the_targets_are_made_on_the_models_device(tmp_path: Path, cfg):
    """Fails if the ranking, the scores or --calibrate's position means stay on the CPU when training runs on
    another device (PyTorch's `meta` device stands in for a GPU: no data, the same device checks)."""
    obj, prepared = _objective(tmp_path, ROWS, **cfg)
    out = obj.targets(_batch([(0, 3, int(prepared.train[0][3]))]), "meta")
    assert [t.device.type for t in out if t is not None] == ["meta"] * (3 if cfg else 2)
