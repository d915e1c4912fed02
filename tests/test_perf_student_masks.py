"""Issue 10: the baseline's dropout masks drawn ahead in a helper thread, with the same result as drawing them in place.

The baseline trains on one thread; drawing its dropout masks (torch's serial Mersenne twister, in float64) took
about a tenth of a step. `fit(draw_ahead=True)` (`student-train --threads 2` without a teacher store) has a helper
thread draw each step's masks from torch's default generator a step or two ahead, in the order the step asks for
them (train.MaskFeed), and validation runs on all threads. Nothing else draws from that generator, so the masks,
the model, the validation metrics and the generator's state at the end are those of the one-thread run.

Caught (each break tried, seen failing):
- the helper drawing a step's masks in another order (the record replayed reversed): other masks, other weights;
- close() not putting the generator back (the helper is ahead when training stops): its state after fit differs;
- the shape check left out of MaskFeed.take: a mask of another shape is handed out instead of an error;
- the check that a step used all of its masks left out: a step that asks for fewer is not refused;
- the helper not used (every mask drawn in the training thread): the thread check fails;
- validation not given the threads back (eval_threads ignored): the threads check fails;
- a record that does not lead with the batch size replayed anyway: the helper's masks for it are refused.
"""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch

from pipeline.data.prepared import load_prepared
from pipeline.data.sequences import training_windows
from pipeline.student import sasrec, train
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.student.train import MaskFeed, TrainConfig, fit, next_item_loss
from tests.distill_helpers import cluster_world, write_world
from tests.test_entrypoint import run_gedistill
from tests.test_perf_distill_ops import _one_thread_and_restore_flag  # noqa: F401 (autouse: 1 thread, fast ops restored)

CFG = dict(hidden=16, n_blocks=2, n_heads=2, inner=32, max_len=8, dropout=0.3, attn_dropout=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    write_world(root / "prepared", cluster_world(n_users=30, length=12, n_items=50, n_clusters=5, seed=4))
    return root, load_prepared(root / "prepared")


def _model(data) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SasrecConfig(n_items=data.n_items, **CFG))


def _fit(data, draw_ahead: bool, epochs: int = 3, patience: int = 10):
    model = _model(data)
    res = fit(model, data, TrainConfig(epochs=epochs, batch_size=8, lr=0.01, patience=patience), show_progress=False,
              draw_ahead=draw_ahead)
    hist = [{k: v for k, v in row.items() if k != "train_seconds"} for row in res.history]
    return hist, model.state_dict(), torch.get_rng_state()


def test_masks_drawn_ahead_give_the_in_place_result(world, monkeypatch):
    _, data = world
    X, _ = training_windows(data.train, CFG["max_len"])
    assert len(X) % 8, "a last batch smaller than the others must be part of the test"
    h_in, w_in, rng_in = _fit(data, draw_ahead=False)
    drawn_by: list[int] = []
    real = sasrec.draw_mask

    def recording(*a, **kw):
        drawn_by.append(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(sasrec, "draw_mask", recording)
    h_ahead, w_ahead, rng_ahead = _fit(data, draw_ahead=True)
    me = threading.get_ident()
    # the first step draws its masks here and records them; every later one comes from the helper
    per_step = 1 + 3 * CFG["n_blocks"]
    assert drawn_by[:per_step] == [me] * per_step
    assert len(set(drawn_by[per_step:])) == 1 and me not in drawn_by[per_step:]
    assert h_ahead == h_in and h_in[-1]["loss"] == h_in[-1]["loss"]  # finite, equal, every epoch
    for k, v in w_in.items():
        assert torch.equal(w_ahead[k], v), k
    assert torch.equal(rng_ahead, rng_in)  # the helper's draws ahead of the last step were undone


def test_an_early_stop_leaves_the_generator_where_the_plain_loop_does(world):
    """Early stopping after the second epoch, with the helper already drawing the third epoch's first steps."""
    _, data = world
    a, b = _fit(data, False, epochs=6, patience=1), _fit(data, True, epochs=6, patience=1)
    assert len(a[0]) < 6 and a[0] == b[0]
    assert torch.equal(a[2], b[2])


def _steps(data, model, n: int, feed: MaskFeed | None) -> None:
    X, Y = (torch.from_numpy(v) for v in training_windows(data.train, CFG["max_len"]))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for b in range(n):
        with feed.step() if feed else contextlib.nullcontext():
            next_item_loss(model, X[b * 8:(b + 1) * 8], Y[b * 8:(b + 1) * 8], "ce", 1, gen)


@pytest.mark.parametrize("stop_at", [1, 3, 5])
def test_a_stop_inside_an_epoch_undoes_the_draws_ahead(world, stop_at):
    """close() after any step (a diverged loss stops there) puts the generator where the plain loop left it."""
    _, data = world
    model = _model(data)
    torch.manual_seed(7)
    _steps(data, model, stop_at, None)
    plain = torch.get_rng_state()
    torch.manual_seed(7)
    feed = MaskFeed([8] * 10, depth=2)
    _steps(data, model, stop_at, feed)
    feed.close()
    assert feed.thread is None
    assert torch.equal(torch.get_rng_state(), plain)


def test_a_mask_unlike_the_recorded_ones_is_refused(world):
    _, data = world
    model = _model(data).train()
    for bad, match in [((8, 8, 17), "asked for where the first step drew"), ((8, 8, 16), "used 1 of the 7 dropout masks")]:
        feed = MaskFeed([8, 8, 8])
        try:
            _steps(data, model, 1, feed)  # records the first step: [8, 8, 16] and [8, 2, 8, 8] masks
            with pytest.raises(RuntimeError, match=match):
                with feed.step():
                    sasrec.dropout(torch.ones(bad), 0.3, True)
        finally:
            feed.close()


def test_draws_the_helper_cannot_replay_stay_in_place():
    """A step whose draws do not lead with the batch size cannot be replayed for another batch size: the feed
    then draws every later mask in place, the same masks as without it."""
    def step_draws():
        return [sasrec.dropout(torch.ones(3, 5), 0.5, True), sasrec.dropout(torch.ones(8, 4), 0.5, True)]

    torch.manual_seed(3)
    plain = [step_draws() for _ in range(3)]
    torch.manual_seed(3)
    feed = MaskFeed([8, 8, 8])
    fed = []
    for _ in range(3):
        with feed.step():
            fed.append(step_draws())
    feed.close()
    assert feed.off and feed.thread is None
    assert all(torch.equal(a, b) for p, f in zip(plain, fed) for a, b in zip(p, f))


def test_validation_runs_on_the_threads_it_is_given(world, monkeypatch):
    _, data = world
    seen: list[int] = []
    real = train.evaluate

    def recording(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(train, "evaluate", recording)
    fit(_model(data), data, TrainConfig(epochs=2, batch_size=8), show_progress=False, draw_ahead=True, eval_threads=2)
    assert seen == [2, 2] and torch.get_num_threads() == 1  # and back to the training threads after


@pytest.mark.slow
def test_installed_baseline_on_two_threads_matches_one(world, tmp_path):
    """The installed command: the baseline with --threads 2 logs the helper thread and writes the same model,
    ranks and history as --threads 1 (byte for byte; the timings are left out of the comparison)."""
    root, _ = world
    common = ["student-train", "--prepared", str(root / "prepared"), "--hidden", "16", "--heads", "2", "--blocks", "2",
              "--max-len", "8", "--epochs", "3", "--batch-size", "8"]
    outs = {}
    for n in ("1", "2"):
        out = tmp_path / f"t{n}"
        r = run_gedistill(*common, "--out", str(out), "--metrics", str(tmp_path / f"m{n}.json"), "--threads", n)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("dropout masks drawn ahead in a second thread" in r.stderr) == (n == "2"), r.stderr[-2000:]
        hist = [{k: v for k, v in row.items() if k != "train_seconds"}
                for row in json.loads((out / "history.json").read_text())]
        outs[n] = (hist, (out / "model.safetensors").read_bytes(), (out / "ranks.parquet").read_bytes())
    assert outs["1"][0] == outs["2"][0]
    assert outs["1"][1] == outs["2"][1] and outs["1"][2] == outs["2"][2]
