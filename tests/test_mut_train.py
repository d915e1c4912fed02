"""The student's training loop (pipeline/student/train.py) against independent references.

Each test names the break it catches. The references are written out here, not called from train.py:
- next_item_loss: the full score matrix with the padding column at -inf and torch's cross-entropy; for
  bce, the same negatives drawn from a clone of the generator;
- rank_targets / evaluate: one unbatched pass in eval mode, ranks counted by hand, the masked variant
  with every history item (not only the last max_len) at -inf;
- fit: the loop replayed step by step (numpy's permutation, the windows, Adam), weights compared bit for bit;
- early stopping: validation NDCG@10 scripted, so that the epoch it stops at and the epoch it keeps are known.
"""

from __future__ import annotations

import io
import logging
import math
import re
import time

import numpy as np
import polars as pl
import pytest
import rich.progress
import torch
import torch.nn.functional as F
from rich.console import Console

import pipeline.student.train as train_mod
from pipeline.data.prepared import load_prepared, write_prepared
from pipeline.data.sequences import left_pad, training_windows
from pipeline.evaluation.metrics import summarize
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.student.train import (TrainConfig, _add_grads, _branch_grads, evaluate, fit, next_item_loss,
                                    rank_targets, split_inputs)
from tests.distill_helpers import script_validation

N_ITEMS = 25
MAX_LEN = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Users with histories of 2 to 14 items (many longer than MAX_LEN), repeats allowed."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    n_users = 23
    train = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(2, 15))).astype(np.int32) for _ in range(n_users)]
    seqs = pl.DataFrame({"user_idx": np.arange(n_users, dtype=np.int32), "user_id": [f"u{u}" for u in range(n_users)],
                         "train": [t.tolist() for t in train],
                         "valid": rng.integers(1, N_ITEMS + 1, n_users).astype(np.int32),
                         "test": rng.integers(1, N_ITEMS + 1, n_users).astype(np.int32)})
    items = pl.DataFrame({"item_idx": np.arange(1, N_ITEMS + 1, dtype=np.int32),
                          "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
                          "title": [f"t{i}" for i in range(1, N_ITEMS + 1)], "text": [""] * N_ITEMS})
    folder = tmp_path_factory.mktemp("prep")
    write_prepared(folder, seqs, items, {})
    return load_prepared(folder)


def _model(dropout: float = 0.0, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SasrecConfig(n_items=N_ITEMS, hidden=8, n_heads=2, n_blocks=1, max_len=MAX_LEN,
                               dropout=dropout, attn_dropout=dropout))


# ---------------------------------------------------------------- next_item_loss

def _windows(prepared):
    X, Y = training_windows(prepared.train, MAX_LEN)
    return torch.from_numpy(X), torch.from_numpy(Y)


def _steps(prepared, batch_size: int) -> int:
    """Optimizer steps in one epoch: every window once, the last batch possibly short."""
    return math.ceil(len(training_windows(prepared.train, MAX_LEN)[0]) / batch_size)


def test_ce_loss_is_cross_entropy_over_real_items_at_target_positions(prepared):
    """Caught: the loss taken at padded positions (y == 0) or over all of them, the padding column left
    scoreable (or another column masked), a +inf or missing mask."""
    m = _model().eval()
    X, Y = _windows(prepared)
    got = next_item_loss(m, X, Y, "ce", 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = m.encode(X)  # [W, L, D]
        logits = h @ m.item_emb.weight.T
        logits[..., 0] = float("-inf")
        keep = Y != 0
        want = F.cross_entropy(logits[keep], Y[keep])
    assert int(keep.sum()) < Y.numel()  # the windows do hold padded positions
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-6)
    # the padding column never carries probability: with its row of the table made huge it would dominate
    with torch.no_grad():
        m.item_emb.weight[0] = 50.0 * m.item_emb.weight[1:].abs().max()
    assert next_item_loss(m, X, Y, "ce", 1, torch.Generator()).item() == pytest.approx(
        F.cross_entropy(torch.cat([torch.full((int(keep.sum()), 1), float("-inf")),
                                   (m.encode(X)[keep] @ m.item_emb.weight[1:].T)], 1), Y[keep]).item(), rel=1e-6)


@pytest.mark.parametrize("n_neg", [1, 3])
def test_bce_loss_uses_the_generators_negatives_from_real_items(prepared, n_neg):
    """Caught: negatives drawn from another range (0 = padding, or n_items + 1 past the table), from torch's
    default generator instead of `gen`, the wrong number of them, or the positive/negative labels swapped."""
    m = _model().eval()
    X, Y = _windows(prepared)
    gen = torch.Generator().manual_seed(11)
    ref_gen = torch.Generator().set_state(gen.get_state())
    torch.manual_seed(123)
    default_state = torch.get_rng_state()
    got = next_item_loss(m, X, Y, "bce", n_neg, gen)
    assert torch.equal(torch.get_rng_state(), default_state)  # nothing drawn from the default generator
    keep = Y != 0
    t = Y[keep]
    neg = torch.randint(1, N_ITEMS + 1, (len(t), n_neg), generator=ref_gen)
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # exactly these draws, no more
    with torch.no_grad():
        h = m.encode(X)[keep]
        pos = (h * m.item_emb(t)).sum(-1)
        negs = (h[:, None, :] * m.item_emb(neg)).sum(-1)
        want = -F.logsigmoid(pos).mean() - F.logsigmoid(-negs).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_bce_negatives_cover_every_real_item_and_never_padding(prepared, monkeypatch):
    """Caught: the range shifted by one at either end (padding drawn, or the last item never drawn)."""
    m = _model().eval()
    seen = []
    real = torch.randint

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(torch, "randint", spy)
    X, Y = _windows(prepared)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        next_item_loss(m, X, Y, "bce", 4, gen)
    drawn = torch.cat([s.ravel() for s in seen])
    assert int(drawn.min()) == 1 and int(drawn.max()) == N_ITEMS


# ---------------------------------------------------------------- split_inputs, rank_targets, evaluate

def test_split_inputs_valid_sees_train_and_test_sees_train_plus_valid(prepared):
    """Caught: test histories without the validation item, or valid histories with it, or swapped targets."""
    h, t = split_inputs(prepared, "valid")
    assert all(np.array_equal(a, b) for a, b in zip(h, prepared.train)) and np.array_equal(t, prepared.valid)
    h, t = split_inputs(prepared, "test")
    assert all(np.array_equal(a, np.append(b, v)) for a, b, v in zip(h, prepared.train, prepared.valid))
    assert np.array_equal(t, prepared.test)


def _ref_ranks(model, histories, targets, masked):
    with torch.no_grad():
        was = model.training
        model.eval()
        s = model.score_all(model.user_embedding(left_pad(histories, MAX_LEN)))
        model.train(was)
    out = []
    for i, (h, tg) in enumerate(zip(histories, targets)):
        row = s[i].clone()
        if masked:
            if int(tg) in set(int(x) for x in h):
                out.append(N_ITEMS)  # a repeat counts as a miss: the last rank of N_ITEMS + 1 columns
                continue
            row[torch.as_tensor(np.asarray(h, dtype=np.int64))] = float("-inf")
        out.append(int((row >= row[int(tg)]).sum()) - 1)
    return np.array(out)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch", [1, 4, 512])
def test_rank_targets_matches_one_unbatched_pass_in_eval_mode(prepared, masked, batch):
    """Caught: a batch boundary lost or repeated, dropout left on while ranking (the model is in train mode
    here, with dropout 0.5), the masked variant masking only the last max_len items (a batch's histories
    cut to its shortest), the training mode not restored afterwards."""
    m = _model(dropout=0.5)
    m.train()
    h, t = split_inputs(prepared, "test")
    assert max(len(x) for x in h) > MAX_LEN
    got = rank_targets(m, h, t, masked=masked, batch=batch)
    assert m.training
    want = _ref_ranks(m, h, t, masked)
    assert got.tolist() == want.tolist()
    if masked:  # the masking mattered
        assert (got != _ref_ranks(m, h, t, False)).any()
    m.eval()
    rank_targets(m, h, t, masked=masked, batch=batch)
    assert not m.training


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("masked", [False, True])
def test_evaluate_summarizes_the_splits_ranks(prepared, split, masked):
    """Caught: evaluate ranking the other split, ignoring `masked`, or summarizing something else."""
    m = _model(seed=5)
    h, t = split_inputs(prepared, split)
    assert evaluate(m, prepared, split, masked=masked) == summarize(_ref_ranks(m, h, t, masked))


# ---------------------------------------------------------------- the two-branch gradient helpers

def test_branch_grads_and_their_sum():
    """Caught: a constant loss differentiated (autograd raises), an unused parameter raising instead of None,
    the branches summed in another order or subtracted, a branch's None overwriting the other's gradient."""
    a, b, unused = (torch.nn.Parameter(torch.tensor([1.0, 2.0])) for _ in range(3))
    params = [a, b, unused]
    assert _branch_grads(torch.zeros(()), params) == [None, None, None]
    g1 = _branch_grads((3 * a).sum() + (b * b).sum(), params)
    assert torch.equal(g1[0], torch.tensor([3.0, 3.0])) and torch.equal(g1[1], torch.tensor([2.0, 4.0])) and g1[2] is None
    g2 = _branch_grads((a * a).sum(), params)
    assert torch.equal(g2[0], torch.tensor([2.0, 4.0])) and g2[1] is None and g2[2] is None
    _add_grads(params, g1, g2)
    assert torch.equal(a.grad, torch.tensor([5.0, 7.0])) and torch.equal(b.grad, torch.tensor([2.0, 4.0]))
    assert unused.grad is None
    _add_grads(params, [None, None, None], g2)
    assert torch.equal(a.grad, torch.tensor([2.0, 4.0])) and b.grad is None
    # order: x + y + z with values where float addition is not associative
    big, small = torch.tensor([1e8]), torch.tensor([1.0])
    p = torch.nn.Parameter(torch.zeros(1))
    _add_grads([p], [big], [small], [-big])
    assert torch.equal(p.grad, (big + small) - big)


# ---------------------------------------------------------------- fit, replayed step by step

def _replay(prepared, cfg: TrainConfig, model: SASRec) -> tuple[list[float], list[dict]]:
    """fit's loop without fit: numpy's permutation per epoch, windows in order, Adam on the summed loss.
    -> each epoch's mean step loss and the weights at each epoch's end."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    X, Y = (torch.from_numpy(a) for a in training_windows(prepared.train, MAX_LEN, cfg.stride))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    means, states = [], []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(X)))
        losses = []
        for b in range(math.ceil(len(X) / cfg.batch_size)):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            loss = next_item_loss(model, X[idx], Y[idx], cfg.loss, cfg.n_neg, gen)
            opt.zero_grad(set_to_none=True)
            (cfg.w_rec * loss).backward()
            opt.step()
            losses.append(loss.item())
        means.append(sum(losses) / len(losses))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return means, states


@pytest.mark.parametrize("kw", [dict(loss="ce", batch_size=7, lr=3e-3, weight_decay=0.0),
                                dict(loss="bce", n_neg=2, batch_size=5, lr=1e-2, weight_decay=0.1, seed=9),
                                dict(loss="ce", batch_size=4, lr=2e-3, stride=3, w_rec=0.5),
                                dict(loss="ce", batch_size=19, lr=2e-3),     # 39 windows: a last batch of one
                                dict(loss="ce", batch_size=100, lr=2e-3)])   # one step an epoch
def test_fit_is_the_plain_loop_bit_for_bit(prepared, kw):
    """Caught: the last partial batch dropped (a last batch of one window included) or a batch repeated
    (steps off by one), another shuffle or seed, lr / weight decay / stride / w_rec / n_neg not passed on,
    the epoch's loss not the mean of its steps (one step included), the bce negatives drawn from a generator
    of another seed."""
    cfg = TrainConfig(epochs=2, patience=50, **kw)
    assert len(training_windows(prepared.train, MAX_LEN, cfg.stride)[0]) % cfg.batch_size != 0
    means, states = _replay(prepared, cfg, _model(dropout=0.2, seed=1))
    m = _model(dropout=0.2, seed=1)
    res = fit(m, prepared, cfg, show_progress=False)
    assert res.best_epoch in (1, 2) and len(res.history) == 2
    for k, v in m.state_dict().items():  # the kept epoch's weights, as the replay had them at that epoch's end
        assert torch.equal(v, states[res.best_epoch - 1][k]), k
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    for row, want in zip(res.history, means):
        assert row["loss_rec"] == pytest.approx(want, rel=1e-12)
        assert row["loss"] == pytest.approx(kw.get("w_rec", 1.0) * want, rel=1e-12)
        assert row["train_seconds"] > 0 and "valid_ndcg@10" in row
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_fit_runs_every_epoch_without_early_stopping_and_ends_in_eval_mode(prepared):
    """Caught: one epoch too few or too many, the model returned in training mode (dropout on at serving)."""
    m = _model(dropout=0.3)
    res = fit(m, prepared, TrainConfig(epochs=3, batch_size=64, patience=50), show_progress=False)
    assert [r["epoch"] for r in res.history] == [1, 2, 3] and not m.training
    assert res.diverged_epoch is None


@pytest.mark.parametrize("series,patience,stop,best", [
    ([0.1, 0.3, 0.3, 0.2, 0.3, 0.9], 2, 4, 2),         # a tie is not an improvement
    ([0.1, 0.2, 0.1, 0.3, 0.1, 0.1, 0.9], 2, 6, 4),    # an improvement resets the count
    ([0.0, 0.0, 0.0, 0.0, 0.9], 3, 4, 1),              # NDCG 0 is still a first best (all misses)
    ([0.5, 0.4, 0.9], 1, 2, 1),                        # patience 1: the first worse epoch stops
])
def test_early_stopping_counts_epochs_without_improvement(prepared, monkeypatch, caplog, series, patience, stop, best):
    """Caught: `>=` for `>` (a tie moves the best epoch), the count not reset on improvement, the best
    started at 0 (an all-miss first epoch never kept: no weights restored), `>` for `>=` in the patience
    test; and the model must end with the kept epoch's weights."""
    snaps = script_validation(monkeypatch, series)
    m = _model(dropout=0.1)
    with caplog.at_level(logging.INFO, logger="pipeline.student.train"):
        res = fit(m, prepared, TrainConfig(epochs=len(series), batch_size=32, patience=patience), show_progress=False)
    assert (len(res.history), res.best_epoch) == (stop, best)
    for k, v in m.state_dict().items():
        assert torch.equal(v, snaps[best - 1][k]), k
    assert f"early stop at epoch {stop} (best {best}" in caplog.text


class _Probe:
    """An objective with a loss on the item table and a parameter of its own; it says nothing of its random
    numbers (no own_rng attribute), so fit must differentiate it with the next-item loss."""

    def __init__(self, scale: float = 1.0):
        self.p = torch.nn.Parameter(torch.ones(8))
        self.scale, self.steps = scale, []

    def parameters(self):
        return [self.p]

    def loss(self, model, step):
        self.steps.append(step)
        out = self.scale * ((model.item_emb.weight[1:4] * self.p).sum(-1) - 1.0).pow(2).mean()
        return out, {"loss_probe": out.item()}

    def end_epoch(self):
        return {"probe_epoch_end": 1.0}


class _Branch(_Probe):
    """A two-branch objective (own_rng, as the distillation: it draws nothing from torch's default generator)."""

    own_rng = True


class _Summed(_Probe):
    """The same objective through the single-backward path (own_rng False)."""

    own_rng = False


@pytest.mark.parametrize("w_rec,loss", [(1.0, "ce"), (0.0, "ce"), (1.0, "bce")])
def test_two_branch_fit_equals_one_backward_over_the_sum(prepared, w_rec, loss):
    """Caught: a branch's gradient dropped or subtracted, the next-item branch run with w_rec = 0 (or skipped
    with w_rec > 0), its bce negatives not `n_neg` from `gen` (from torch's default generator instead, whose
    stream the dropout masks share), the objective's step counter wrong, its parameter not trained, the logs
    not merged."""
    cfg = TrainConfig(epochs=2, batch_size=16, lr=5e-3, patience=50, w_rec=w_rec, loss=loss, n_neg=3)
    # dropout on: its masks come from torch's default generator, so negatives drawn there would shift them
    m1, o1 = _model(dropout=0.2, seed=4), _Branch()
    r1 = fit(m1, prepared, cfg, objective=o1, show_progress=False)
    m2, o2 = _model(dropout=0.2, seed=4), _Summed()
    r2 = fit(m2, prepared, cfg, objective=o2, show_progress=False)
    steps = _steps(prepared, 16)
    assert o1.steps == list(range(2 * steps)) == o2.steps
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), k
    assert torch.allclose(o1.p, o2.p, atol=1e-6) and not torch.equal(o1.p.detach(), torch.ones(8))
    for a, b in zip(r1.history, r2.history):
        assert ("loss_rec" in a) == (w_rec > 0) == ("loss_rec" in b)
        assert a["probe_epoch_end"] == 1.0 and a["loss_probe"] == pytest.approx(b["loss_probe"], rel=1e-4)
        assert a["loss"] == pytest.approx(a.get("loss_rec", 0.0) * w_rec + a["loss_probe"], rel=1e-6)


def test_two_branches_in_a_second_thread_give_the_same_bits(prepared):
    """Caught: the concurrent path computing anything other than the sequential one (a step index shifted,
    the branches summed in the other order)."""
    cfg = TrainConfig(epochs=2, batch_size=16, lr=5e-3, patience=50)
    out = []
    for concurrent in (False, True):
        m, o = _model(seed=4), _Branch()
        r = fit(m, prepared, cfg, objective=o, show_progress=False, concurrent=concurrent)
        out.append((m.state_dict(), o.p.detach().clone(), [h["loss"] for h in r.history], o.steps))
    (s1, p1, l1, st1), (s2, p2, l2, st2) = out
    assert l1 == l2 and st1 == st2 and torch.equal(p1, p2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_a_nan_loss_is_never_stepped_into_the_weights(prepared):
    """Caught: the finiteness check after opt.step (NaN weights), or no check at all."""
    m = _model()
    o = _Branch(scale=float("nan"))
    with pytest.raises(train_mod.UsageError, match="diverged in epoch 1 \\(training loss nan at step 0\\)"):
        fit(m, prepared, TrainConfig(epochs=2, batch_size=16), objective=o, show_progress=False)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())
    assert o.steps == [0]


# ---------------------------------------------------------------- what a user sees: the progress bar and the log

def test_the_progress_bar_shows_epoch_steps_loss_and_times_then_clears(prepared, monkeypatch):
    """Caught: the bar hidden by default, a column dropped (description, bar, M/N, the loss, elapsed or remaining
    time), the epoch or the step total not set on reset, steps advanced by other than one, the loss text or
    the description replaced, the bar left on screen when training ends (transient), a bar drawn when
    show_progress=False."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(rich.progress, "get_console", lambda: console)
    steps = _steps(prepared, 16)
    fit(_model(), prepared, TrainConfig(epochs=2, batch_size=16, patience=5))  # show_progress left at its default
    raw = buf.getvalue()
    frames = [f for f in raw.split("\r\x1b[2K") if f and not f.startswith("\x1b[?25l")]
    assert re.fullmatch(rf"train +0/{steps} +0:00:0\d -:--:--", frames[0].strip()), frames[0]
    final = raw.split("\r\x1b[2K")[-1].split("\n")[0]  # the frame drawn when training ends, then the erase
    assert re.fullmatch(rf"epoch 2 ━+ {steps}/{steps} loss \d+\.\d{{4}} \d:\d\d:\d\d \d:\d\d:\d\d", final.strip()), final
    assert raw.endswith("\x1b[1A\x1b[2K")  # then erased (transient): cursor up, line cleared
    buf.seek(0), buf.truncate()
    fit(_model(), prepared, TrainConfig(epochs=1, batch_size=16, patience=5), show_progress=False)
    assert "train" not in buf.getvalue() and "epoch" not in buf.getvalue()  # asked for none: nothing drawn


def _messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.student.train" and r.levelno == level]


def test_the_log_names_each_epochs_numbers_and_the_early_stop(prepared, monkeypatch, caplog):
    """Caught: the per-epoch line's format, its values not rounded to 4 places, the epoch repeated inside it,
    the early-stop line's wording."""
    script_validation(monkeypatch, [0.25, 0.125])
    with caplog.at_level(logging.INFO, logger="pipeline.student.train"):
        res = fit(_model(), prepared, TrainConfig(epochs=2, batch_size=16, patience=1), show_progress=False)
    msgs = _messages(caplog)
    for row, msg in zip(res.history, msgs):
        want = {k: round(v, 4) for k, v in row.items() if k != "epoch"}
        assert msg == f"epoch {row['epoch']}: {want}"
        assert "'epoch'" not in msg and f"'valid_ndcg@10': {round(row['valid_ndcg@10'], 4)}" in msg
    assert msgs[-1] == "early stop at epoch 2 (best 1, valid ndcg@10 0.2500)"


class _NanAt(_Branch):
    """Finite until `at` steps have run, then a NaN loss."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def loss(self, model, step):
        out, logs = super().loss(model, step)
        return (out * float("nan"), logs) if step >= self.at else (out, logs)


def test_a_diverged_epoch_is_recorded_and_warned_with_its_step(prepared, caplog):
    """Caught: the history row's reason replaced, the warning's wording or reason dropped, the first-epoch
    error's advice changed."""
    steps = _steps(prepared, 16)
    with caplog.at_level(logging.INFO, logger="pipeline.student.train"):
        res = fit(_model(), prepared, TrainConfig(epochs=4, batch_size=16, patience=5), objective=_NanAt(steps + 1),
                  show_progress=False)
    assert res.diverged_epoch == 2 and res.best_epoch == 1
    assert res.history[-1]["diverged"] == f"training loss nan at step {steps + 1}"
    assert _messages(caplog, logging.WARNING) == [
        f"epoch 2 diverged (training loss nan at step {steps + 1}): stopping with epoch 1's weights"]
    with pytest.raises(train_mod.UsageError) as e:
        fit(_model(), prepared, TrainConfig(epochs=2, batch_size=16), objective=_NanAt(0), show_progress=False)
    assert str(e.value) == ("training diverged in epoch 1 (training loss nan at step 0) before any epoch finished "
                            "with finite scores; lower --lr")


def test_train_seconds_is_the_epochs_own_time(prepared):
    """Caught: the epoch's start added instead of subtracted (a time since boot)."""
    t0 = time.perf_counter()
    res = fit(_model(), prepared, TrainConfig(epochs=2, batch_size=16, patience=5), show_progress=False)
    wall = time.perf_counter() - t0
    assert all(0 < r["train_seconds"] < wall for r in res.history)
    assert sum(r["train_seconds"] for r in res.history) < wall


def test_validation_during_training_is_unmasked(prepared):
    """Caught: evaluate's default turned to the masked protocol, which fit's validation (and early stopping)
    would then use silently."""
    m = _model(seed=2)
    h, t = split_inputs(prepared, "valid")
    assert evaluate(m, prepared, "valid") == summarize(_ref_ranks(m, h, t, False))
    assert evaluate(m, prepared, "valid") != evaluate(m, prepared, "valid", masked=True)


@pytest.mark.parametrize("cls,branched", [(_Branch, True), (_Summed, False), (_Probe, False)])
def test_only_an_own_rng_objective_is_differentiated_as_a_branch(prepared, monkeypatch, cls, branched):
    """Caught: every objective treated as a branch (`or` for `and`, a missing own_rng taken as True)."""
    calls = []
    real = train_mod._branch_grads

    def spy(loss, params):
        calls.append(1)
        return real(loss, params)

    monkeypatch.setattr(train_mod, "_branch_grads", spy)
    assert hasattr(cls(), "own_rng") == (cls is not _Probe)
    fit(_model(), prepared, TrainConfig(epochs=1, batch_size=64, patience=5), objective=cls(), show_progress=False)
    assert bool(calls) == branched
