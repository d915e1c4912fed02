"""The distillation objective on hand-made stores: targets, calibration, confidence, h_dec, leakage.

Expected values are written out by hand (softmax of small integer vectors, computed once on paper
and with a calculator), never with the functions under test.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store, position_mean_scores
from pipeline.errors import UsageError
from pipeline.data.prepared import load_prepared
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.data.sequences import left_pad
from tests.distill_helpers import cluster_teacher_rows, cluster_world, hand_rows, write_teacher_store, write_world

# softmax(-rank) for ranks (0, 1, 2): 1, e^-1, e^-2 over 1 + e^-1 + e^-2 = 1.5032147
Q012 = [0.66524096, 0.24472847, 0.09003057]


@pytest.fixture(scope="module")
def world_prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    world = cluster_world(n_users=6, length=8, n_items=20, n_clusters=4, seed=0)
    write_world(root / "prepared", world)
    return root, world, load_prepared(root / "prepared")


def _objective(tmp_path, world, prepared, rows, **cfg):
    cols = hand_rows(world["train"], rows)
    write_teacher_store(tmp_path / "store", cols, prepared_fingerprint=prepared.fingerprint)
    shards = list(open_teacher_store(tmp_path / "store", prepared).shard_paths)
    cfg = {"teacher_batch_size": len(rows), "buffer_rows": len(rows), **cfg}
    return DistillObjective(DistillConfig(**cfg), prepared, shards, 8, 8)


def _two_rows(world, ranking_a, ranking_b, scores_a, scores_b):
    return [{"user_idx": 0, "position": 3, "candidates": [1, 2, 3], "ranking": ranking_a, "scores": scores_a},
            {"user_idx": 1, "position": 4, "candidates": [4, 5, 6], "ranking": ranking_b, "scores": scores_b}]


def _by_sample(batch, *tensors):
    """Reorder batch-aligned tensors by sample id (the stream shuffles)."""
    order = np.argsort(batch.sample_id)
    return [t[order] for t in tensors]


def _expected_l_rank(obj, model, batch, q, w=None):
    """-mean_b sum_i w_bi q_bi log softmax(s_b)_i with s from the model itself; q, w in sample-id order."""
    seqs = left_pad([obj.prepared.train[u][max(0, p - 8):p] for u, p in zip(batch.user_idx, batch.position)], 8)
    with torch.no_grad():
        s = model.score_items(model.user_embedding(seqs), torch.from_numpy(batch.candidates))
    (log_p,) = _by_sample(batch, torch.log_softmax(s, 1))
    q = torch.tensor(q)
    w = torch.ones_like(q) if w is None else torch.tensor(w)
    return float(-(w * q * log_p).sum(1).mean())


def _model(n_items):
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=n_items, hidden=8, n_blocks=1, n_heads=1, inner=16, max_len=8)).eval()


def test_default_ranking_target_by_hand(tmp_path, world_prep):
    """Stored rankings [2, 0, 1] and [0, 1, 2] -> per-candidate ranks [1, 2, 0] and [0, 1, 2] ->
    softmax(-rank / T). Fails if ranks_from_ranking inverts the permutation the wrong way (scatter
    vs gather), if the target ignores the temperature, or if the loss is not ListNet over these targets."""
    _, world, prepared = world_prep
    obj = _objective(tmp_path, world, prepared, _two_rows(world, [2, 0, 1], [0, 1, 2], [0, 0, 0], [0, 0, 0]),
                     w_rank=1.0, lambda_emb=0.0)
    batch = next(obj._batches)
    ranks, q, conf = obj.targets(batch)
    ranks, q = _by_sample(batch, ranks, q)
    assert ranks.tolist() == [[1, 2, 0], [0, 1, 2]] and conf is None
    assert torch.allclose(q, torch.tensor([[Q012[1], Q012[2], Q012[0]], Q012]), atol=1e-6)
    obj_t2 = _objective(tmp_path / "t2", world, prepared, _two_rows(world, [2, 0, 1], [0, 1, 2], [0, 0, 0], [0, 0, 0]),
                        temperature=2.0)
    b2 = next(obj_t2._batches)
    (q2,) = _by_sample(b2, obj_t2.targets(b2)[1])
    # T = 2: 1, e^-0.5, e^-1 over 1.9744101
    assert torch.allclose(q2[1], torch.tensor([0.50648039, 0.30719589, 0.18632372]), atol=1e-6)

    model = _model(world["n_items"])
    obj2 = _objective(tmp_path / "again", world, prepared, _two_rows(world, [2, 0, 1], [0, 1, 2], [0, 0, 0], [0, 0, 0]),
                      w_rank=1.0, lambda_emb=0.0)
    loss, logs = obj2.loss(model, 0)
    b = next(iter(obj2.stream))  # same seed, same first batch
    want = _expected_l_rank(obj2, model, b, [[Q012[1], Q012[2], Q012[0]], Q012])
    assert logs["l_rank"] == pytest.approx(want, rel=1e-5) and float(loss.detach()) == pytest.approx(want, rel=1e-5)


def test_calibrate_path_by_hand(tmp_path, world_prep):
    """Scores [2, 1, 0] and [4, 0, 1]: position means [3, 0.5, 0.5]; calibrated [-1, .5, -.5] and
    [1, -.5, .5] -> ranks [2, 0, 1] and [0, 2, 1], overriding the stored rankings. Fails if --calibrate
    does not subtract the position means, keeps the stored ranking, or ranks ascending."""
    _, world, prepared = world_prep
    rows = _two_rows(world, [0, 1, 2], [1, 0, 2], [2, 1, 0], [4, 0, 1])
    obj = _objective(tmp_path, world, prepared, rows, calibrate=True, lambda_emb=0.0)
    assert obj.position_mean.tolist() == [3.0, 0.5, 0.5]
    assert position_mean_scores(list(obj.stream.shards)).tolist() == [3.0, 0.5, 0.5]
    batch = next(obj._batches)
    ranks, q, _ = obj.targets(batch)
    ranks, q = _by_sample(batch, ranks, q)
    assert ranks.tolist() == [[2, 0, 1], [0, 2, 1]]
    assert torch.allclose(q, torch.tensor([[Q012[2], Q012[0], Q012[1]], [Q012[0], Q012[2], Q012[1]]]), atol=1e-6)
    # with the score target, q is the softmax of the calibrated scores themselves
    obj_s = _objective(tmp_path / "s", world, prepared, rows, calibrate=True, target="scores")
    bs = next(obj_s._batches)
    (qs,) = _by_sample(bs, obj_s.targets(bs)[1])
    assert torch.allclose(qs, torch.tensor([[0.14024438, 0.62853172, 0.23122390],
                                            [0.54654939, 0.12195165, 0.33149896]]), atol=1e-6)

    model = _model(world["n_items"])
    obj2 = _objective(tmp_path / "loss", world, prepared, rows, calibrate=True, lambda_emb=0.0)
    _, logs = obj2.loss(model, 0)
    b = next(iter(obj2.stream))
    want = _expected_l_rank(obj2, model, b, [[Q012[2], Q012[0], Q012[1]], [Q012[0], Q012[2], Q012[1]]])
    assert logs["l_rank"] == pytest.approx(want, rel=1e-5)


def test_gamma_confidence_uses_the_teachers_scores_with_the_ranking_target(tmp_path, world_prep):
    """Both rows have the same ranking but the first teacher is sure (scores [10, 0, 0]) and the
    second is not ([0.1, 0, 0]). Fails if the confidence weight comes from softmax(-rank / T), whose
    entropy is the same in every row, so that --gamma-confidence weights every sample 1 (a no-op)."""
    _, world, prepared = world_prep
    rows = _two_rows(world, [0, 1, 2], [0, 1, 2], [10, 0, 0], [0.1, 0, 0])
    # by hand: p = softmax(scores); c = 1 - H(p) / ln 3; w = c / mean(c)
    ent = []
    for sc in ([10, 0, 0], [0.1, 0, 0]):
        e = [math.exp(x) for x in sc]
        p = [x / sum(e) for x in e]
        ent.append(-sum(x * math.log(x) for x in p))
    c = [1 - h / math.log(3) for h in ent]
    w = [ci / (sum(c) / 2) for ci in c]
    assert w[0] > 1.9 and w[1] < 0.1  # the sure teacher carries almost all the weight
    model = _model(world["n_items"])
    obj = _objective(tmp_path, world, prepared, rows, gamma_confidence=1.0, lambda_emb=0.0)
    _, logs = obj.loss(model, 0)
    b = next(iter(obj.stream))
    want = _expected_l_rank(obj, model, b, [Q012, Q012], [[w[0]] * 3, [w[1]] * 3])
    unweighted = _expected_l_rank(obj, model, b, [Q012, Q012])
    assert logs["l_rank"] == pytest.approx(want, rel=1e-5) and abs(want - unweighted) > 1e-3


def test_a_row_at_or_after_the_end_of_training_is_refused(tmp_path, world_prep):
    """A row at position len(train[u]) has the validation item as its target; beyond, in its history.
    Fails if such a store is accepted for distillation (leakage), or if the error does not name the
    shard and the sample."""
    _, world, prepared = world_prep
    n = len(world["train"][2])
    for p, target in ((n, int(world["valid"][2])), (n + 1, int(world["test"][2]))):
        rows = [{"user_idx": 0, "position": 3, "candidates": [1, 2, 3], "ranking": [0, 1, 2], "scores": [0, 0, 0]},
                {"user_idx": 2, "position": p, "target": target, "candidates": [4, 5, 6], "ranking": [0, 1, 2],
                 "scores": [0, 0, 0]}]
        with pytest.raises(UsageError, match=r"part-00000-of-00001\.parquet: teacher sample 1 position .*leakage"):
            _objective(tmp_path / str(p), world, prepared, rows)


def test_streamed_h_dec_is_the_stored_rows(tmp_path, world_prep):
    """Fails if the stream pairs a row with another row's h_dec (e.g. a shuffle applied to some
    columns only): every streamed h_dec must equal the stored one of the same sample_id, bit for bit."""
    _, world, prepared = world_prep
    cols = cluster_teacher_rows(world, k=5, same_cluster=2, last_m=4, width=6)
    write_teacher_store(tmp_path / "store", cols, prepared_fingerprint=prepared.fingerprint, shard_rows=7)
    shards = list(open_teacher_store(tmp_path / "store", prepared).shard_paths)
    stored = {}
    for path in shards:
        t = pq.read_table(path, columns=["sample_id", "h_dec", "target"])
        for sid, h, tg in zip(t["sample_id"].to_pylist(), t["h_dec"].to_pylist(), t["target"].to_pylist()):
            stored[sid] = (np.asarray(h, np.float16), tg)
    obj = DistillObjective(DistillConfig(teacher_batch_size=5, buffer_rows=10), prepared, shards, 8, 8)
    seen = set()
    for _ in range(12):
        b = next(obj._batches)
        for sid, h, tg in zip(b.sample_id, b.h_dec, b.target):
            assert np.array_equal(h, stored[int(sid)][0]) and tg == stored[int(sid)][1], sid
            seen.add(int(sid))
    assert len(seen) == len(stored)


def _cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of row vectors: 1 = same geometry up to rotation and scale."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float(np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def test_embedding_loss_alone_moves_the_student_toward_the_teachers_geometry(tmp_path):
    """w_rank = 0: only the h_dec half of distillation is on. With lambda_emb > 0 the student's user
    embeddings of the store's samples take the geometry of the teacher's h_dec (linear CKA rises);
    with lambda_emb = 0 they do not. Fails if lambda_emb is ignored, or the embedding loss does not
    reach the student (e.g. u_sas detached)."""
    from pipeline.student.train import TrainConfig, fit

    torch.set_num_threads(1)
    world = cluster_world(n_users=40, length=10, n_items=60, n_clusters=6, seed=3)
    write_world(tmp_path / "prepared", world)
    prepared = load_prepared(tmp_path / "prepared")
    cols = cluster_teacher_rows(world, k=6, same_cluster=2, last_m=3, width=12, noise=0.1)
    write_teacher_store(tmp_path / "store", cols, prepared_fingerprint=prepared.fingerprint, shard_rows=64)
    shards = list(open_teacher_store(tmp_path / "store", prepared).shard_paths)
    h = np.stack(cols["h_dec"]).astype(np.float64)
    seqs = left_pad([world["train"][u][max(0, p - 10):p] for u, p in zip(cols["user_idx"], cols["position"])], 10)
    cka = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        model = SASRec(SasrecConfig(n_items=60, hidden=16, n_blocks=1, n_heads=1, inner=32, max_len=10,
                                    dropout=0.1, attn_dropout=0.1))
        obj = DistillObjective(DistillConfig(w_rank=0.0, lambda_emb=lam, teacher_batch_size=32, buffer_rows=64),
                               prepared, shards, 16, 10)
        fit(model, prepared, TrainConfig(epochs=8, batch_size=16, lr=5e-3, patience=8, w_rec=0.1), objective=obj,
            show_progress=False)
        with torch.no_grad():
            cka[lam] = _cka(model.user_embedding(seqs).numpy().astype(np.float64), h)
    assert cka[1.0] > cka[0.0] + 0.15, cka


def test_lambda_emb_weights_the_embedding_loss(tmp_path, world_prep):
    """Same batch, same model: the total differs by exactly (lambda_a - lambda_b) * l_emb. Fails if
    lambda_emb is silently ignored or applied twice."""
    _, world, prepared = world_prep
    rows = _two_rows(world, [0, 1, 2], [0, 1, 2], [0, 0, 0], [0, 0, 0])
    out = {}
    for lam in (0.0, 2.5):
        obj = _objective(tmp_path / str(lam), world, prepared, rows, lambda_emb=lam)
        loss, logs = obj.loss(_model(world["n_items"]), 0)
        out[lam] = (float(loss.detach()), logs["l_emb"], logs["l_rank"])
    assert out[0.0][1] == pytest.approx(out[2.5][1]) and out[0.0][1] > 0
    assert out[0.0][0] == pytest.approx(out[0.0][2])
    assert out[2.5][0] == pytest.approx(out[2.5][2] + 2.5 * out[2.5][1], rel=1e-6)
