import math

import numpy as np
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.student.losses_distill import (
    embedding_loss,
    importance_weights,
    listnet_loss,
    ranks_from_ranking,
    teacher_distribution,
)
from pipeline.student.teacher_stream import TeacherStream
from tests.distill_helpers import teacher_rows, write_store


# ---------------------------------------------------------------- pure losses

def test_ranks_invert_the_ranking():
    ranking = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert ranks_from_ranking(ranking).tolist() == [[1, 2, 0], [0, 1, 2]]


def test_rank_target_is_a_decreasing_distribution():
    ranks = torch.tensor([[1, 2, 0, 3]])
    q = teacher_distribution(ranks, None, "ranking", temperature=1.0)
    assert torch.allclose(q.sum(1), torch.ones(1))
    assert q[0].argsort(descending=True).tolist() == [2, 0, 1, 3]
    assert math.isclose(float(q[0, 2] / q[0, 0]), math.e, rel_tol=1e-5)
    sharper = teacher_distribution(ranks, None, "ranking", temperature=0.1)
    assert sharper[0, 2] > 0.99


def test_score_target_is_the_softmax_of_stored_scores():
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    q = teacher_distribution(torch.zeros(1, 3, dtype=torch.long), scores, "scores", temperature=2.0)
    # by hand: exp(0.5), exp(1.5), exp(1.0) over their sum
    assert torch.allclose(q, torch.tensor([[0.18632372, 0.50648039, 0.30719589]]), atol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        teacher_distribution(torch.zeros(1, 3, dtype=torch.long), None, "scores", 1.0)


def test_listnet_is_minimal_when_student_matches_teacher():
    q = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0]]), 1)
    s = q.log().clone().requires_grad_(True)
    loss = listnet_loss(s, q)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-6)
    entropy = -(q * q.log()).sum()
    assert math.isclose(float(loss.detach()), float(entropy), rel_tol=1e-5)
    assert float(listnet_loss(torch.tensor([[-1.0, 0.0, 2.0, 0.0]]), q)) > float(loss.detach())


def test_importance_weights_off_gives_plain_listnet():
    ranks = torch.tensor([[0, 1, 2, 3]])
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, torch.randn(1, 4))
    assert torch.equal(w, torch.ones(1, 4))


def test_position_weight_favours_the_teachers_top_items():
    ranks = torch.tensor([[3, 0, 2, 1]])
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, torch.randn(1, 4), gamma_position=1.0, position_beta=1.0)
    assert w[0].argsort(descending=True).tolist() == [1, 3, 2, 0]
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)


def test_confidence_weight_trusts_a_peaked_teacher_more():
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    scores = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    q = teacher_distribution(ranks, scores, "scores", 1.0)
    w = importance_weights(ranks, q, torch.randn(2, 3), gamma_confidence=1.0)
    assert float(w[0, 0]) > float(w[1, 0]) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)


def test_agreement_weight_marks_shared_top_items():
    ranks = torch.tensor([[0, 1, 2, 3]])
    student = torch.tensor([[5.0, -1.0, 4.0, 0.0]])  # student top-2: 0 and 2; teacher top-2: 0 and 1
    q = teacher_distribution(ranks, None, "ranking", 1.0)
    w = importance_weights(ranks, q, student, gamma_agreement=1.0, agreement_k=2)
    assert w[0, 0] > 0 and torch.all(w[0, 1:] == 0)
    with pytest.raises(ValueError, match="gammas"):
        importance_weights(ranks, q, student, gamma_agreement=0.8, gamma_position=0.5)


def test_embedding_losses_and_the_collapse_they_allow():
    g = torch.Generator().manual_seed(0)
    p, u = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    # by hand: rows differ by (3, 4) and (1, 0): squared norms 25 and 1, mean 13
    a, b = torch.tensor([[1.0, 1.0], [2.0, 5.0]]), torch.tensor([[4.0, 5.0], [1.0, 5.0]])
    assert math.isclose(float(embedding_loss(a, b, "mse")), 13.0, rel_tol=1e-6)
    # cosine by hand: (1,0) vs (0,2) -> 1 - 0; (1,1) vs (2,2) -> 1 - 1; mean 0.5
    assert math.isclose(float(embedding_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                                             torch.tensor([[0.0, 2.0], [2.0, 2.0]]), "cosine")), 0.5, rel_tol=1e-6)
    # MSE rewards shrinking both sides: the collapse the norms are logged for
    assert embedding_loss(0.01 * p, 0.01 * u, "mse") < 0.01 * embedding_loss(p, u, "mse")
    # cosine and standardized are scale-free, so shrinking gains nothing
    for kind in ("cosine", "standardized"):
        assert math.isclose(float(embedding_loss(0.1 * p, 0.1 * u, kind)), float(embedding_loss(p, u, kind)), rel_tol=1e-3)
    assert float(embedding_loss(p, 3 * p, "cosine")) < 1e-6
    assert float(embedding_loss(p, 2 * p + 5, "standardized")) < 1e-6
    # a constant (collapsed) student gets no credit from the standardized loss
    assert float(embedding_loss(p, torch.ones(16, 8), "standardized")) > 0.9


# ---------------------------------------------------------------- streaming the store

def _toy_train(n_users=40, length=12, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=length) for _ in range(n_users)]


def test_stream_covers_the_store_shuffled_and_deterministic(tmp_path):
    train = _toy_train()
    cols = teacher_rows(train, 50, k=5, width=8, last_m=4)  # 160 rows
    shards = write_store(tmp_path, cols, shards=3, row_group_rows=16)
    n = len(cols["sample_id"])

    def take(seed, n_batches):
        it = iter(TeacherStream(shards, 16, buffer_rows=48, read_rows=8, seed=seed))
        return [next(it) for _ in range(n_batches)]

    batches = take(1, 3 * n // 16)  # three passes' worth
    ids = np.concatenate([b.sample_id for b in batches])
    counts = np.bincount(ids, minlength=n)
    assert counts.min() >= 2 and counts.max() <= 4  # every row, about three times
    assert not np.array_equal(ids[:n], np.arange(n))  # shuffled
    again = np.concatenate([b.sample_id for b in take(1, 10)])
    assert np.array_equal(again, ids[:160])
    other = np.concatenate([b.sample_id for b in take(2, 10)])
    assert not np.array_equal(other, ids[:160])
    b = batches[0]
    assert b.candidates.shape == (16, 5) and b.ranking.shape == (16, 5) and b.h_dec.shape == (16, 8)
    assert b.h_dec.dtype == np.float16
    # rows stay aligned: the stored target is the user's item at the stored position
    for u, p, t in zip(b.user_idx, b.position, b.target):
        assert train[u][p] == t


def test_stream_drops_failed_rows_and_empty_histories(tmp_path):
    train = _toy_train(n_users=10, length=4)
    cols = teacher_rows(train, 50, k=5, width=8, last_m=4)  # includes position 1..3
    cols["status"] = ["failed" if i % 2 else "ok" for i in range(len(cols["status"]))]
    cols["position"][0] = 0
    shards = write_store(tmp_path, cols, shards=1, row_group_rows=7)
    it = iter(TeacherStream(shards, 4, buffer_rows=8, seed=0))
    ids = np.concatenate([next(it).sample_id for _ in range(10)])
    assert np.all(ids % 2 == 0) and 0 not in ids


def test_config_refuses_bad_settings():
    from pipeline.student.distill import DistillConfig

    with pytest.raises(UsageError, match="emb_loss"):
        DistillConfig(emb_loss="l1")
    with pytest.raises(UsageError, match="gammas"):
        DistillConfig(gamma_position=0.7, gamma_agreement=0.7)


# ---------------------------------------------------------------- the objective in the training loop

from pipeline.student.distill import DistillConfig, DistillObjective, init_from_baseline, open_teacher_store  # noqa: E402
from pipeline.data.prepared import load_prepared  # noqa: E402
from pipeline.student.sasrec import SASRec, SasrecConfig  # noqa: E402
from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    world = cluster_world(n_users=30, length=8, n_items=50, n_clusters=5, seed=4)
    write_world(root / "prepared", world)
    prepared = load_prepared(root / "prepared")
    write_teacher_store(root / "store", cluster_teacher_rows(world, k=6, same_cluster=2, last_m=3, width=12),
                        prepared_fingerprint=prepared.fingerprint, shard_rows=40)
    return root, world, prepared


def _model(n_items, hidden=16, max_len=8):
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=n_items, hidden=hidden, n_blocks=1, n_heads=1, inner=32, max_len=max_len))


def test_objective_loss_trains_the_projector_and_logs_the_collapse_check(small):
    root, world, prepared = small
    info = open_teacher_store(root / "store", prepared)
    obj = DistillObjective(DistillConfig(teacher_batch_size=8, buffer_rows=32, emb_loss="mse"), prepared,
                           list(info.shard_paths), 16, 8)
    model = _model(world["n_items"])
    loss, logs = obj.loss(model, 0)
    assert loss.ndim == 0 and {"l_rank", "l_emb", "u_norm", "proj_norm"} <= logs.keys()
    assert math.isclose(float(loss.detach()), logs["l_rank"] + logs["l_emb"], rel_tol=1e-5)
    loss.backward()
    assert obj.projector.weight.grad is not None and obj.projector.weight.grad.abs().sum() > 0
    assert model.item_emb.weight.grad.abs().sum() > 0
    obj.loss(model, 1)
    epoch = obj.end_epoch()
    assert {"l_rank", "l_emb", "u_norm", "proj_norm"} <= epoch.keys() and epoch["u_norm"] > 0
    assert obj.end_epoch().get("l_emb") is None  # reset after each epoch


def test_store_rows_that_disagree_with_the_sequences_are_refused(small, tmp_path):
    root, world, prepared = small
    cols = cluster_teacher_rows(world, k=6, same_cluster=2, last_m=3, width=12)
    cols["target"] = [t % world["n_items"] + 1 for t in cols["target"]]  # every target off by one
    write_teacher_store(tmp_path / "bad", cols, prepared_fingerprint=prepared.fingerprint)
    # refused before training starts, naming the shard and the row
    with pytest.raises(UsageError, match=r"part-00000-of-\d+\.parquet: teacher sample 0 .*not an item of the training"):
        DistillObjective(DistillConfig(teacher_batch_size=4, buffer_rows=8), prepared,
                         list(open_teacher_store(tmp_path / "bad", prepared).shard_paths), 16, 8)


def test_store_from_other_candidates_is_refused(small, tmp_path):
    root, world, prepared = small
    from pipeline.data.candidates import write_candidates

    cands = tmp_path / "candidates.parquet"
    write_candidates(cands, np.array([0]), np.array([1]), np.array([world["train"][0][1]]),
                     np.arange(1, 7)[None], np.zeros((1, 6), np.float32), {"prepared_fingerprint": prepared.fingerprint})
    with pytest.raises(UsageError, match="candidates fingerprint: store synthetic"):
        open_teacher_store(root / "store", prepared, cands)


def test_init_from_baseline_copies_weights_and_refuses_another_architecture(small, tmp_path):
    root, world, prepared = small
    from pipeline.student.checkpoint import save_student

    base = _model(world["n_items"])
    with torch.no_grad():
        base.item_emb.weight.add_(1.0)
    save_student(tmp_path / "baseline", base, {"prepared_fingerprint": prepared.fingerprint})
    student = _model(world["n_items"])
    init_from_baseline(student, tmp_path / "baseline", prepared)
    assert torch.equal(student.item_emb.weight, base.item_emb.weight)
    with pytest.raises(UsageError, match="hidden: baseline 16, now 32"):
        init_from_baseline(_model(world["n_items"], hidden=32), tmp_path / "baseline", prepared)


# ---------------------------------------------------------------- the transfer proof

def _cluster_precision(model, prepared, world, k=20):
    """Per test user: the fraction of the top-k items that lie in the cluster the hidden rule says comes next."""
    from pipeline.data.sequences import left_pad
    from pipeline.student.train import split_inputs

    hist, _ = split_inputs(prepared, "test")
    with torch.no_grad():
        model.eval()
        top = model.score_all(model.user_embedding(left_pad(hist, model.config.max_len))).topk(k, dim=1).indices.numpy()
    want = world["g"][world["cluster"][prepared.valid]]
    return (world["cluster"][top] == want[:, None]).mean(axis=1)


@pytest.mark.slow
def test_transfer_proof_oracle_teacher_helps_and_shuffled_teacher_does_not(tmp_path):
    """A teacher that knows the hidden item clusters moves that knowledge into the student; noise does not.

    The world: 150 users, 600 items in 30 hidden clusters, next item drawn from cluster
    g(cluster(last item)). About 4 interactions per item, so the baseline struggles to learn the
    clusters from co-occurrence. The oracle teacher ranks the true next item first, then its
    cluster mates, and its h_dec encodes the target's cluster. The shuffled teacher ranks at random
    and its h_dec describes a random item.
    """
    from pipeline.evaluation.metrics import per_user
    from pipeline.evaluation.stats import paired_bootstrap
    from pipeline.student.train import TrainConfig, fit, rank_targets, split_inputs

    torch.set_num_threads(1)
    world = cluster_world(n_users=150, length=15, n_items=600, n_clusters=30, seed=0)
    write_world(tmp_path / "prepared", world)
    prepared = load_prepared(tmp_path / "prepared")
    for teacher in ("oracle", "shuffled"):
        write_teacher_store(tmp_path / teacher, cluster_teacher_rows(world, teacher=teacher),
                            prepared_fingerprint=prepared.fingerprint, shard_rows=256)
    hist, targets = split_inputs(prepared, "test")
    results = {}
    for teacher in ("baseline", "oracle", "shuffled"):
        torch.manual_seed(0)
        model = SASRec(SasrecConfig(n_items=600, hidden=32, n_blocks=1, n_heads=1, inner=64, max_len=15,
                                    dropout=0.2, attn_dropout=0.2))
        objective = None
        if teacher != "baseline":
            info = open_teacher_store(tmp_path / teacher, prepared)
            objective = DistillObjective(DistillConfig(target="scores", teacher_batch_size=128), prepared,
                                         list(info.shard_paths), 32, 15)
        fit(model, prepared, TrainConfig(epochs=40, batch_size=32, patience=40, seed=0), objective=objective,
            show_progress=False)
        results[teacher] = {"ndcg@10": per_user(rank_targets(model, hist, targets), "ndcg@10"),
                            "cluster": _cluster_precision(model, prepared, world)}

    base = results["baseline"]
    oracle_cluster = paired_bootstrap(base["cluster"], results["oracle"]["cluster"], n_boot=1000, seed=0)
    oracle_ndcg = paired_bootstrap(base["ndcg@10"], results["oracle"]["ndcg@10"], n_boot=1000, seed=0)
    assert oracle_cluster.significant and oracle_cluster.diff > 0.05, oracle_cluster
    assert oracle_ndcg.diff > 0.01, oracle_ndcg
    for metric in ("cluster", "ndcg@10"):
        shuffled = paired_bootstrap(base[metric], results["shuffled"][metric], n_boot=1000, seed=0)
        assert not (shuffled.significant and shuffled.diff > 0), (metric, shuffled)
        assert shuffled.diff < 0.01, (metric, shuffled)


def test_calibration_removes_a_position_bias(tmp_path):
    from pipeline.student.distill import position_mean_scores

    train = _toy_train(n_users=60, length=10)
    cols = teacher_rows(train, 50, k=6, width=4, last_m=5)  # oracle: target ranked first
    bias = np.array([8.0, 4.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    true_top = [int(r[0]) for r in cols["ranking"]]
    cols["scores"] = [(np.array(s) + bias).tolist() for s in cols["scores"]]
    shards = write_store(tmp_path, cols, shards=2, row_group_rows=50)
    scores = np.array(cols["scores"])
    assert (scores.argmax(1) == 0).mean() > 0.7  # biased: mostly the first identifier
    mean = position_mean_scores(shards)
    assert np.allclose(mean, scores.mean(0), atol=1e-5)
    calibrated = scores - mean
    assert (calibrated.argmax(1) == np.array(true_top)).mean() > 0.95
