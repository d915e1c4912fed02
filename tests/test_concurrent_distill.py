"""Issue 10: a distilled step runs its teacher branch in a second thread, with the same result as one thread.

fit(concurrent=True) differentiates the next-item loss in the calling thread and the distillation objective
(teacher histories through SASRec, ListNet, embedding loss) in a worker thread, then sums the two gradients in
a fixed order. That is only the same computation as the one-thread run if the objective's branch draws no random
number from torch's default generator (which the next-item branch uses): its dropout masks come from the
objective's own generator. `student-train --threads 2` does this.

Caught (each break tried, seen failing):
- the teacher pass drawing its dropout masks from torch's default generator (`user_embedding(seqs)` without
  `gen`): the two threads then race for one stream (concurrent != sequential);
- the one-thread run differentiating the summed loss in one backward (the path fit takes for other
  objectives) while the two-thread run sums the branches' gradients: other bits, so --threads would change
  the model;
- the worker not used (concurrent=True running the objective in the calling thread): the thread check fails.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from pipeline.data.prepared import load_prepared
from pipeline.student import sasrec
from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.student.train import TrainConfig, fit
from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world
from tests.test_entrypoint import run_gedistill
from tests.test_perf_distill_ops import _one_thread_and_restore_flag  # noqa: F401 (autouse: 1 thread, fast ops restored)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    w = cluster_world(n_users=30, length=12, n_items=50, n_clusters=5, seed=4)
    write_world(root / "prepared", w)
    data = load_prepared(root / "prepared")
    write_teacher_store(root / "store", cluster_teacher_rows(w, k=6, same_cluster=2, last_m=3, width=12),
                        prepared_fingerprint=data.fingerprint, shard_rows=40)
    return root, data, list(open_teacher_store(root / "store", data).shard_paths)


class _Recording(DistillObjective):
    """The real objective, recording which thread computed each step's loss."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.threads: set[int] = set()

    def loss(self, model, step):
        self.threads.add(threading.get_ident())
        return super().loss(model, step)


def _fit(world, concurrent: bool, fast: bool = True, w_rec: float = 1.0):
    _, data, shards = world
    sasrec.FAST_TRAIN_OPS = fast
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, n_blocks=2, n_heads=2, inner=32, max_len=8,
                                dropout=0.3, attn_dropout=0.3))
    obj = _Recording(DistillConfig(teacher_batch_size=8, buffer_rows=32), data, shards, 16, 8)
    res = fit(model, data, TrainConfig(epochs=3, batch_size=8, lr=0.01, patience=10, w_rec=w_rec), objective=obj,
              show_progress=False, concurrent=concurrent)
    hist = [{k: v for k, v in row.items() if k != "train_seconds"} for row in res.history]
    return hist, model.state_dict(), obj


@pytest.mark.parametrize("fast", [True, False])
def test_the_teacher_branch_in_a_second_thread_gives_the_one_thread_result(world, fast):
    h_seq, w_seq, o_seq = _fit(world, concurrent=False, fast=fast)
    h_con, w_con, o_con = _fit(world, concurrent=True, fast=fast)
    assert o_seq.threads == {threading.get_ident()}
    assert len(o_con.threads) == 1 and threading.get_ident() not in o_con.threads  # it did run elsewhere
    assert h_con == h_seq and h_seq[-1]["loss"] == h_seq[-1]["loss"]  # finite, equal, every epoch
    for k, v in w_seq.items():
        assert torch.equal(w_con[k], v), k
    h_again, _, _ = _fit(world, concurrent=True, fast=fast)
    assert h_again == h_con  # and the same again


def test_an_objective_with_nothing_to_train_leaves_the_next_item_loss_alone(world):
    """w_rank 0 and lambda_emb 0: the objective's loss is a constant with no gradient. Its branch then gives no
    gradient instead of failing (autograd refuses a loss that needs none), in one thread and in two alike."""
    _, data, shards = world
    runs = []
    for concurrent in (False, True):
        torch.manual_seed(0)
        model = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, max_len=8, dropout=0.3, attn_dropout=0.3))
        obj = DistillObjective(DistillConfig(w_rank=0.0, lambda_emb=0.0, teacher_batch_size=8, buffer_rows=32), data,
                               shards, 16, 8)
        res = fit(model, data, TrainConfig(epochs=2, batch_size=8, lr=0.01), objective=obj, show_progress=False,
                  concurrent=concurrent)
        runs.append(([{k: v for k, v in r.items() if k != "train_seconds"} for r in res.history], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(runs[1][1][k], v), k


def test_teacher_losses_only_runs_too(world):
    """w_rec 0: no next-item branch at all; the objective's gradients alone, either way."""
    (h1, w1, _), (h2, w2, _) = _fit(world, False, w_rec=0.0), _fit(world, True, w_rec=0.0)
    assert h1 == h2 and "loss_rec" not in h1[0]
    for k, v in w1.items():
        assert torch.equal(w2[k], v), k


def test_the_teacher_pass_leaves_torchs_default_generator_alone(world):
    """The property the second thread rests on: the objective's loss draws nothing from torch's default generator
    (its masks come from its own), while the model is training (dropout on)."""
    _, data, shards = world
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, max_len=8, dropout=0.3, attn_dropout=0.3)).train()
    obj = DistillObjective(DistillConfig(teacher_batch_size=8, buffer_rows=32), data, shards, 16, 8)
    before, own = torch.get_rng_state(), obj.gen.get_state()
    loss, _ = obj.loss(model, 0)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(obj.gen.get_state(), own)  # its masks were drawn, from its own generator


@pytest.mark.slow
def test_installed_student_train_on_two_threads_matches_one(world, tmp_path):
    """The installed command: --threads 2 logs the second thread and writes the same model and history as
    --threads 1 (byte for byte; the timings are left out of the comparison)."""
    root, _, _ = world
    common = ["student-train", "--prepared", str(root / "prepared"), "--teacher-cache", str(root / "store"),
              "--hidden", "16", "--heads", "2", "--blocks", "2", "--max-len", "8", "--epochs", "3",
              "--batch-size", "8", "--teacher-batch-size", "8", "--buffer-rows", "32"]
    outs = {}
    for n in ("1", "2"):
        out = tmp_path / f"t{n}"
        r = run_gedistill(*common, "--out", str(out), "--metrics", str(tmp_path / f"m{n}.json"), "--threads", n)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("the teacher branch in a second thread" in r.stderr) == (n == "2"), r.stderr[-2000:]
        hist = [{k: v for k, v in row.items() if k != "train_seconds"}
                for row in json.loads((out / "history.json").read_text())]
        outs[n] = (hist, (out / "model.safetensors").read_bytes(), (out / "ranks.parquet").read_bytes())
    assert outs["1"][0] == outs["2"][0]
    assert outs["1"][1] == outs["2"][1] and outs["1"][2] == outs["2"][2]
