import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.checkpoint import save_student
from pipeline.distill import DistillConfig, DistillObjective, open_teacher_store
from pipeline.errors import UsageError
from pipeline.prepared import load_prepared
from pipeline.sasrec import SASRec, SasrecConfig
from pipeline.teacher_quality import TeacherQuality, ndcg_single
from pipeline.train import TrainConfig, fit
from stages.cli import app
from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world

PNG = b"\x89PNG\r\n\x1a\n"


def test_teacher_quality_on_hand_made_samples():
    cands = np.array([[5, 6, 7], [5, 6, 7], [8, 9, 10], [5, 6, 7]])
    ranking = np.array([[1, 0, 2], [0, 1, 2], [2, 1, 0], [0, 2, 1]])
    target = np.array([6, 7, 1, 5])  # 3rd: target absent
    status = np.array(["ok", "repaired", "ok", "failed"], dtype=object)
    student = np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    q = TeacherQuality(3, ("s",))
    q.update(cands, ranking, target, status, {"s": student})
    r = q.result()
    assert r["samples"] == 4 and r["target_in_candidates"] == 0.75
    assert r["parse_failure_rate"] == 0.25 and r["repaired_rate"] == 0.25
    assert r["top1_position_counts"] == [1, 1, 1]  # failed row left out
    # teacher: sample 1 target index 1 ranked first; sample 2 target index 2 ranked last
    assert r["teacher"]["samples_scored"] == 2
    assert r["teacher"]["ndcg@k_where_present"] == pytest.approx((1.0 + 1 / np.log2(4)) / 2)
    assert r["teacher"]["hr@1_where_present"] == 0.5
    # student: sample 1 target (score 1.0) rank 1; sample 2 target (score 1.0) rank 2
    assert r["s"]["mean_rank_where_present"] == 1.5
    assert r["random_ndcg@k"] == pytest.approx(ndcg_single(np.arange(3)).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    world = cluster_world(n_users=60, length=10, n_items=80, n_clusters=8, seed=5)
    write_world(root / "prepared", world)
    prepared = load_prepared(root / "prepared")
    write_teacher_store(root / "store", cluster_teacher_rows(world, k=10, same_cluster=3, last_m=3, width=16),
                        prepared_fingerprint=prepared.fingerprint, shard_rows=64)
    cfg = SasrecConfig(n_items=80, hidden=16, n_blocks=1, n_heads=1, inner=32, max_len=10)
    for run in ("baseline", "distilled"):
        torch.manual_seed(0)
        model = SASRec(cfg)
        obj = None
        if run == "distilled":
            info = open_teacher_store(root / "store", prepared)
            obj = DistillObjective(DistillConfig(teacher_batch_size=32, buffer_rows=128), prepared,
                                   list(info.shard_paths), 16, 10)
        res = fit(model, prepared, TrainConfig(epochs=3, batch_size=16, seed=0), objective=obj, show_progress=False)
        save_student(root / run, model, {"prepared_fingerprint": prepared.fingerprint})
        (root / run / "history.json").write_text(json.dumps(res.history))
    return root


def test_evaluate_command_writes_metrics_table_and_plots(trained):
    root = trained
    out = root / "metrics" / "evaluate.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--prepared", str(root / "prepared"), "--baseline", str(root / "baseline"),
        "--distilled", str(root / "distilled"), "--teacher-cache", str(root / "store"),
        "--metrics", str(out), "--plots", str(root / "plots"), "--n-boot", "200", "--threads", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "distilled vs baseline" in result.output and "95% CI" in result.output
    assert "teacher on its own candidate sets" in result.output
    m = json.loads(out.read_text())
    assert set(m["test"]) == {"baseline", "distilled"}
    for name in ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10"):
        d = m["difference"][name]
        assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["n_users"] == 60
        assert d["diff"] == pytest.approx(m["test"]["distilled"][name] - m["test"]["baseline"][name])
        assert m["verdict"][name].endswith(("baseline", "distilled"))
    t = m["teacher"]
    assert t["samples"] == 180 and t["target_in_candidates"] == 1.0 and t["parse_failure_rate"] == 0.0
    # the controlled teacher always ranks the target first
    assert t["teacher"]["ndcg@k_where_present"] == 1.0 and t["teacher"]["hr@1_where_present"] == 1.0
    assert 0 < t["baseline"]["ndcg@k_where_present"] < 1.0
    for png in ("training.png", "comparison.png", "teacher.png"):
        data = (root / "plots" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_evaluate_refuses_a_student_from_other_data(trained, tmp_path):
    world = cluster_world(n_users=20, length=6, n_items=80, n_clusters=8, seed=9)
    write_world(tmp_path / "other", world)
    from stages.evaluate import evaluate

    with pytest.raises(UsageError, match="trained on other prepared data"):
        evaluate(prepared=tmp_path / "other", baseline=trained / "baseline", distilled=trained / "distilled",
                 metrics=tmp_path / "m.json", plots=tmp_path / "plots")
