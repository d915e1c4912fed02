"""The training loop: deterministic under a seed, both losses learn, early stopping keeps the best epoch."""

from pathlib import Path

import pytest
import torch

from pipeline.prepare import PrepareConfig, build_sequences
from pipeline.prepared import load_prepared, write_prepared
from pipeline.sasrec import SASRec, SasrecConfig
from pipeline.train import TrainConfig, evaluate, fit
from tests.conftest import synthetic_interactions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
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
