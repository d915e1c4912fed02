import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.student.checkpoint import save_student
from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
from pipeline.errors import UsageError
from pipeline.data.prepared import load_prepared
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.evaluation.teacher_quality import TeacherQuality, ndcg_single
from pipeline.student.train import TrainConfig, fit
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
    # a random order over K=3 puts the target at each rank with probability 1/3: (1 + 1/log2(3) + 1/2) / 3
    assert r["random_ndcg@k"] == pytest.approx(0.7103099)


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


@pytest.fixture(scope="module")
def good_and_bad(trained):
    """Two checkpoints of known, different quality: trained 15 epochs at lr 0.01 (test NDCG@10 about
    0.33 on this world), and the same architecture never trained (about 0.05)."""
    prepared = load_prepared(trained / "prepared")
    cfg = SasrecConfig(n_items=80, hidden=16, n_blocks=1, n_heads=1, inner=32, max_len=10)
    torch.manual_seed(1)
    save_student(trained / "untrained", SASRec(cfg), {"prepared_fingerprint": prepared.fingerprint})
    torch.manual_seed(0)
    model = SASRec(cfg)
    fit(model, prepared, TrainConfig(epochs=15, batch_size=16, lr=0.01, patience=15, seed=0), show_progress=False)
    save_student(trained / "good", model, {"prepared_fingerprint": prepared.fingerprint})
    return trained / "good", trained / "untrained"


def _evaluate_json(root, baseline, distilled, out, *extra) -> dict:
    result = CliRunner().invoke(app, [
        "evaluate", "--prepared", str(root / "prepared"), "--baseline", str(baseline), "--distilled", str(distilled),
        "--metrics", str(out), "--plots", str(out.parent / "plots"), "--n-boot", "500", "--threads", "1", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_evaluate_tells_the_better_model_apart_on_the_test_split(trained, good_and_bad):
    """Fails if evaluate swaps the checkpoints (numbers under the wrong name, or a verdict naming the
    worse model), or compares on the validation split instead of test: each reported number must
    equal pipeline.student.train.evaluate(model, data, "test") of the checkpoint given under that name."""
    from pipeline.student.checkpoint import load_student
    from pipeline.student.train import evaluate as split_metrics

    prepared = load_prepared(trained / "prepared")
    good, bad = good_and_bad
    expect = {name: split_metrics(load_student(path)[0], prepared, "test") for name, path in (("good", good), ("bad", bad))}
    valid = split_metrics(load_student(good)[0], prepared, "valid")
    # the data must make the break visible: valid and test numbers of the same model differ
    assert valid["ndcg@10"] != pytest.approx(expect["good"]["ndcg@10"])
    assert expect["good"]["ndcg@10"] > expect["bad"]["ndcg@10"] + 0.05

    for base, dist, better in ((bad, good, "distilled"), (good, bad, "baseline")):
        m = _evaluate_json(trained, base, dist, trained / f"cmp-{better}" / "evaluate.json")
        got_b, got_d = m["test"]["baseline"], m["test"]["distilled"]
        want_b, want_d = (expect["bad"], expect["good"]) if better == "distilled" else (expect["good"], expect["bad"])
        for name in ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10"):
            assert got_b[name] == pytest.approx(want_b[name]) and got_d[name] == pytest.approx(want_d[name]), name
        worse = "baseline" if better == "distilled" else "distilled"
        assert m["verdict"]["ndcg@10"] == f"{better} is significantly better than {worse}"
        assert m["difference"]["ndcg@10"]["diff"] == pytest.approx(want_d["ndcg@10"] - want_b["ndcg@10"])


def test_evaluate_masked_writes_test_masked_with_masked_numbers(trained, good_and_bad):
    """Fails if `evaluate --masked` files its numbers under the key `test` (they would pass for the
    unmasked ones), or if they are not the masked test metrics of each checkpoint."""
    from pipeline.student.checkpoint import load_student
    from pipeline.evaluation.metrics import summarize
    from pipeline.student.train import rank_targets, split_inputs

    prepared = load_prepared(trained / "prepared")
    good, bad = good_and_bad
    m = _evaluate_json(trained, bad, good, trained / "masked" / "evaluate.json", "--masked")
    assert "test" not in m and set(m["test_masked"]) == {"baseline", "distilled"} and m["settings"]["masked"]
    h, t = split_inputs(prepared, "test")
    for name, path in (("baseline", bad), ("distilled", good)):
        model = load_student(path)[0]
        masked = summarize(rank_targets(model, h, t, masked=True))
        assert m["test_masked"][name]["ndcg@10"] == pytest.approx(masked["ndcg@10"])
        assert masked != summarize(rank_targets(model, h, t, masked=False))  # masking changed something


class _FixedScores(torch.nn.Module):
    """A 'model' with fixed item scores, to check masking by hand: item i scores 10 - i."""

    def __init__(self, max_len: int, n_items: int):
        super().__init__()
        self.config = SasrecConfig(n_items=n_items, hidden=8, n_blocks=1, n_heads=1, max_len=max_len)
        self.n_items = n_items

    def user_embedding(self, seqs):
        return torch.zeros(len(seqs), 1)

    def score_all(self, u):
        s = (10.0 - torch.arange(self.n_items + 1, dtype=torch.float32)).repeat(len(u), 1)
        s[:, 0] = float("-inf")  # padding, as SASRec.score_all
        return s


def test_masked_ranks_mask_the_whole_history_by_hand():
    """Fails if masking covers only the last max_len items the model sees, not the whole history.

    Scores: item 1 > 2 > 3 > 4 > 5. History [1, 2, 3], max_len 2 (the model sees [2, 3]), target 4.
    Unmasked: items 1, 2, 3 outrank 4 -> rank 3. Whole history masked -> rank 0. Masking only the
    last max_len items would leave item 1 -> rank 1. Second user: history [5], target 1 -> rank 0 both.
    """
    from pipeline.student.train import rank_targets

    model = _FixedScores(max_len=2, n_items=5)
    hist = [np.array([1, 2, 3]), np.array([5])]
    targets = np.array([4, 1])
    assert rank_targets(model, hist, targets, masked=False).tolist() == [3, 0]
    assert rank_targets(model, hist, targets, masked=True).tolist() == [0, 0]


def test_a_bad_teacher_store_is_refused_before_the_students_are_compared(trained, tmp_path, monkeypatch):
    """Fails if evaluate compares the students (minutes on real data) before opening the teacher store."""
    import stages.evaluate as ev
    from pipeline.errors import UsageError

    root = trained
    prepared = root / "prepared"
    calls = []
    monkeypatch.setattr(ev, "compare_students", lambda *a, **k: calls.append(1) or {})
    bad = tmp_path / "not-a-store"
    bad.mkdir()
    with pytest.raises(UsageError):
        ev.evaluate(prepared=prepared, baseline=root / "baseline", distilled=root / "distilled", teacher_cache=[bad],
                    metrics=tmp_path / "m.json", plots=tmp_path / "plots")
    assert calls == []
