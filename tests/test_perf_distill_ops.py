"""Issue 10's speed changes to the student are pure: the same bits as the torch ops they replace.

- sasrec.dropout draws its mask as `rand(float64) < keep`, which must consume the CPU generator exactly as
  `bernoulli_(keep)` (nn.Dropout, SDPA's math path) does. Caught (each break tried, seen failing): drawing the
  mask in float32 (other draws, other masks: 15 of 16 tests fail); leaving out the 1/keep scaling (14 fail).
  Multiplying by 1/keep instead of dividing gave the same bits here, so it is not claimed as caught.
- sasrec.attention_train replays SDPA's math path. Caught: scaling q alone by 1/sqrt(d) instead of q and k by
  its square root each (float differences: torch.equal fails); the additive mask left out (both fail).
- train.next_item_loss adds a [-inf, 0, ...] row in one addmm instead of setting column 0 in place. Caught: a
  zero row without the -inf (the loss differs).
- fit() builds Adam with foreach=True (the per-parameter loop's arithmetic in fewer dispatches). Caught:
  fused=True instead (faster, but other rounding: the fit test fails).
- End to end: fit() with FAST_TRAIN_OPS on and off gives the same history and weights, baseline and distilled.
  Caught: any of the above, and the additive mask not sliced for the last-only block.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.sequences import left_pad
from pipeline.student import sasrec
from pipeline.student.sasrec import SASRec, SasrecConfig, attention_train, dropout
from pipeline.student.train import TrainConfig, fit, next_item_loss


@pytest.fixture(autouse=True)
def _one_thread_and_restore_flag():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    sasrec.FAST_TRAIN_OPS = True
    torch.set_num_threads(n)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.95])
@pytest.mark.parametrize("shape", [(7,), (4, 50, 64), (3, 2, 9, 9)])
def test_dropout_is_torchs_dropout_bit_for_bit(p, shape):
    x = torch.randn(shape)
    torch.manual_seed(11)
    ref = F.dropout(x, p, True)
    after_ref = torch.get_rng_state()
    torch.manual_seed(11)
    got = dropout(x, p, True)
    assert torch.equal(got, ref)
    assert torch.equal(torch.get_rng_state(), after_ref)  # the next draw (the next mask) is the same too
    assert dropout(x, p, False) is x and dropout(x, 0.0, True) is x


@pytest.mark.parametrize("last_only", [False, True])
def test_attention_train_is_sdpas_math_path_bit_for_bit(last_only):
    B, h, L, d = 5, 2, 9, 8
    q, k, v = (torch.randn(B, h, L, d, requires_grad=True) for _ in range(3))
    valid = torch.rand(B, L) > 0.4
    allowed = ((torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(L, dtype=torch.bool))[:, None]
    add = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    qq, mask, amask = (q[:, :, -1:], allowed[:, :, -1:], add[:, :, -1:]) if last_only else (q, allowed, add)
    torch.manual_seed(3)
    ref = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, dropout_p=0.5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.manual_seed(3)
    got = attention_train(qq, k, v, amask, 0.5)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert torch.equal(got, ref)
    for a, b in zip(g_got, g_ref):
        assert torch.equal(a, b)


def _old_next_item_loss(model, x, y):
    h = model.encode(x)[y != 0]
    logits = h @ model.item_emb.weight.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, y[y != 0])


def test_next_item_loss_is_the_in_place_formulation_bit_for_bit():
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=40, hidden=16, n_heads=2, inner=32, max_len=8)).eval()
    x = left_pad([np.arange(1, 9), np.array([3, 4, 5]), np.array([7])], 8)
    y = torch.roll(x, -1, 1)
    y[:, -1] = torch.tensor([9, 6, 8])
    y[x == 0] = 0
    grads = []
    for fn in (_old_next_item_loss, lambda m, a, b: next_item_loss(m, a, b, "ce", 1, torch.Generator())):
        model.zero_grad()
        loss = fn(model, x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)


def _fit(data, fast: bool, objective=None, epochs: int = 2):
    sasrec.FAST_TRAIN_OPS = fast
    torch.manual_seed(0)
    model = SASRec(SasrecConfig(n_items=data.n_items, hidden=16, n_blocks=2, n_heads=2, inner=32, max_len=8,
                                dropout=0.3, attn_dropout=0.3))
    res = fit(model, data, TrainConfig(epochs=epochs, batch_size=8, lr=0.01, patience=10), objective=objective,
              show_progress=False)
    hist = [{k: v for k, v in row.items() if k != "train_seconds"} for row in res.history]
    return hist, model.state_dict()


def test_fit_is_the_same_with_and_without_the_fast_ops(tmp_path):
    from pipeline.data.prepared import load_prepared
    from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
    from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world

    world = cluster_world(n_users=30, length=12, n_items=50, n_clusters=5, seed=4)
    write_world(tmp_path / "prepared", world)
    data = load_prepared(tmp_path / "prepared")
    write_teacher_store(tmp_path / "store", cluster_teacher_rows(world, k=6, same_cluster=2, last_m=3, width=12),
                        prepared_fingerprint=data.fingerprint, shard_rows=40)
    shards = list(open_teacher_store(tmp_path / "store", data).shard_paths)

    def objective():
        return DistillObjective(DistillConfig(teacher_batch_size=8, buffer_rows=32), data, shards, 16, 8)

    for make in (lambda: None, objective):
        (h_slow, w_slow), (h_fast, w_fast) = _fit(data, False, make()), _fit(data, True, make())
        assert h_fast == h_slow and math.isfinite(h_fast[-1]["loss"])
        for k, v in w_slow.items():
            assert torch.equal(w_fast[k], v), k
