"""The training loop: deterministic under a seed, both losses learn, early stopping keeps the best epoch."""

from pathlib import Path

import pytest
import torch

from pipeline.data.prepare import PrepareConfig, build_sequences
from pipeline.data.prepared import load_prepared, write_prepared
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.student.train import TrainConfig, evaluate, fit
from tests.conftest import synthetic_interactions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models: two threads only spin against each other on a shared machine
    inter = synthetic_interactions(n_users=50, n_items=30, length=10, seed=1).rename(
        {"user_id": "user", "item_id": "item", "timestamp": "ts"}).with_row_index("row")
    seqs, items, _ = build_sequences(inter, None, PrepareConfig())
    folder = Path(tmp_path_factory.mktemp("prep"))
    write_prepared(folder, seqs, items, {})
    return load_prepared(folder)


def train(data, **kw):
    torch.manual_seed(0)
    m = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, max_len=8, dropout=0.1, attn_dropout=0.1))
    res = fit(m, data, TrainConfig(epochs=kw.pop("epochs", 8), batch_size=16, lr=0.01, patience=20, **kw),
              show_progress=False)
    return m, res


def test_same_seed_same_model(data):
    m1, r1 = train(data, epochs=3)
    m2, r2 = train(data, epochs=3)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    _, r3 = train(data, epochs=3, seed=7)
    assert [h["loss"] for h in r3.history] != [h["loss"] for h in r1.history]


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_both_losses_learn_and_best_epoch_is_kept(data, loss):
    m, res = train(data, loss=loss, epochs=12, n_neg=4)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    best = max(h["valid_ndcg@10"] for h in res.history)
    assert res.history[res.best_epoch - 1]["valid_ndcg@10"] == best
    # the model ends with the best epoch's weights
    assert evaluate(m, data, "valid")["ndcg@10"] == pytest.approx(best)
    assert evaluate(m, data, "test")["hr@10"] > 0.5  # random would be 10/30


# ---------------------------------------------------------------- divergence, early stopping, paired projector

import math  # noqa: E402

import numpy as np  # noqa: E402

import pipeline.student.train as train_mod  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from tests.distill_helpers import script_validation  # noqa: E402



class ProbeObjective:
    """A stand-in extra objective: one parameter that moves every step, recorded at each epoch's end.

    poison="loss" returns a NaN loss from `at_epoch` on; poison="weights" sets the model's input
    LayerNorm to NaN at the end of `at_epoch` (finite loss, NaN validation scores).
    """

    def __init__(self, model, poison: str = "", at_epoch: int = 0):
        self.model, self.poison, self.at_epoch = model, poison, at_epoch
        self.p = torch.nn.Parameter(torch.zeros(4))
        self.epoch, self.seen = 1, []

    def parameters(self):
        return [self.p]

    def loss(self, model, step):
        loss = 1e-3 * (self.p - 100.0).pow(2).sum()
        if self.poison == "loss" and self.epoch >= self.at_epoch:
            loss = loss * float("nan")
        return loss, {}

    def end_epoch(self):
        self.seen.append(self.p.detach().clone())
        if self.poison == "weights" and self.epoch == self.at_epoch:
            with torch.no_grad():
                self.model.ln.weight.fill_(float("nan"))
        self.epoch += 1
        return {}


def _small_model(data):
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=data.n_items, hidden=16, max_len=8, dropout=0.1, attn_dropout=0.1))


@pytest.mark.parametrize("poison", ["loss", "weights"])
def test_a_diverged_epoch_never_becomes_best(data, poison):
    """Fails if fit keeps a NaN epoch as its best (a NaN target ranked first, so NDCG@10 = 1.0), or ends
    with NaN weights: training stops at the diverged epoch with the best earlier weights restored."""
    m = _small_model(data)
    obj = ProbeObjective(m, poison, at_epoch=3)
    res = fit(m, data, TrainConfig(epochs=6, batch_size=16, lr=0.01, patience=20), objective=obj, show_progress=False)
    assert res.diverged_epoch == 3 and len(res.history) == 3
    assert "diverged" in res.history[2] and "valid_ndcg@10" not in res.history[2]
    assert res.best_epoch in (1, 2)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())
    best = res.history[res.best_epoch - 1]["valid_ndcg@10"]
    assert best < 1.0 and evaluate(m, data, "valid")["ndcg@10"] == pytest.approx(best)


def test_divergence_in_the_first_epoch_is_a_usage_error(data):
    """Fails if a run that never had a finite epoch returns a NaN model as if it were trained."""
    m = _small_model(data)
    with pytest.raises(UsageError, match="diverged in epoch 1.*lower --lr"):
        fit(m, data, TrainConfig(epochs=3, batch_size=16, lr=0.01), objective=ProbeObjective(m, "weights", 1),
            show_progress=False)


def test_early_stopping_stops_and_pairs_the_projector_with_the_best_epoch(data, monkeypatch):
    """Validation NDCG@10 is scripted (0.1, 0.3, 0.2, 0.2, ...): best epoch 2, patience 2 -> stop after epoch 4.

    Fails if early stopping never stops (all 10 epochs run), if the best epoch is not the one kept,
    or if the objective's parameters (the distillation projector) keep the last epoch's values while
    the model gets the best epoch's (the checkpoint then paired weights of two epochs)."""
    snapshots = script_validation(monkeypatch, [0.1, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    m = _small_model(data)
    obj = ProbeObjective(m)
    res = fit(m, data, TrainConfig(epochs=10, batch_size=16, lr=0.01, patience=2), objective=obj, show_progress=False)
    assert len(res.history) == 4 and res.best_epoch == 2
    assert torch.equal(obj.p.detach(), obj.seen[1]) and not torch.equal(obj.seen[1], obj.seen[3])
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_training_windows_never_hold_a_validation_or_test_item(tmp_path, monkeypatch):
    """Fails if fit's training windows are cut from anything but the training sequences (e.g. from
    train + valid): every validation and test item here is unique, so any appearance is a leak."""
    import polars as pl

    from pipeline.data.prepared import write_prepared

    rng = np.random.default_rng(0)
    n_users, n_train_items = 30, 40
    train = [rng.integers(1, n_train_items + 1, size=int(rng.integers(3, 15))) for _ in range(n_users)]
    valid = np.arange(n_train_items + 1, n_train_items + 1 + n_users)  # items seen only as validation targets
    test = valid + n_users  # ... and only as test targets
    n_items = int(test.max())
    seqs = pl.DataFrame({"user_idx": np.arange(n_users, dtype=np.int32), "user_id": [f"u{u}" for u in range(n_users)],
                         "train": [t.astype(np.int32).tolist() for t in train],
                         "valid": valid.astype(np.int32), "test": test.astype(np.int32)})
    items = pl.DataFrame({"item_idx": np.arange(1, n_items + 1, dtype=np.int32),
                          "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                          "title": [f"t{i}" for i in range(1, n_items + 1)], "text": [""] * n_items})
    write_prepared(tmp_path, seqs, items, {})
    prepared = load_prepared(tmp_path)
    seen = []
    real = train_mod.training_windows

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(train_mod, "training_windows", spy)
    m = SASRec(SasrecConfig(n_items=n_items, hidden=8, n_heads=1, max_len=6))
    fit(m, prepared, TrainConfig(epochs=1, batch_size=64), show_progress=False)
    (x, y), = seen
    held_out = set(valid.tolist()) | set(test.tolist())
    assert not held_out & set(x.ravel().tolist()) and not held_out & set(y.ravel().tolist())
    # and nothing is lost: every training target is trained once
    assert sorted(y[y != 0].tolist()) == sorted(int(i) for t in train for i in t[1:])
