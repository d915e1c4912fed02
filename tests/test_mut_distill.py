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
