"""The student's training loop: next-item loss over every prefix, optional extra objective, early stopping."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from pipeline.errors import UsageError
from pipeline.evaluation.metrics import NonFiniteScores, masked_target_ranks, summarize, target_ranks
from pipeline.data.prepared import Prepared
from pipeline.student import sasrec
from pipeline.student.sasrec import SASRec
from pipeline.data.sequences import left_pad, training_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 16  # windows per step (about 640 targets on ML-100K); chosen on validation, see README
    lr: float = 2e-3
    weight_decay: float = 0.0
    loss: Literal["ce", "bce"] = "ce"
    n_neg: int = 1  # sampled negatives per target, for loss="bce"
    stride: int | None = None  # window step; None = max_len (no overlap)
    w_rec: float = 1.0  # weight of the next-item loss (0 = teacher losses only)
    patience: int = 20  # epochs without a better validation NDCG@10
    seed: int = 2020
    eval_batch: int = 512


class Objective(Protocol):
    """An extra loss trained together with the model (e.g. distillation from a teacher store)."""

    def parameters(self) -> Iterable[nn.Parameter]: ...
    def loss(self, model: SASRec, step: int) -> tuple[Tensor, dict[str, float]]: ...
    def end_epoch(self) -> dict[str, float]: ...


@dataclass
class FitResult:
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    diverged_epoch: int | None = None  # the epoch whose loss or scores were non-finite; training stopped there


def next_item_loss(model: SASRec, x: Tensor, y: Tensor, kind: str, n_neg: int, gen: torch.Generator) -> Tensor:
    """x, y [B, L]; loss over positions with a target (y != 0)."""
    h = model.encode(x)[y != 0]  # [M, D]
    t = y[y != 0]  # [M]
    if kind == "ce":
        # [M, N+1], column 0 (padding) at -inf: h @ E^T + [-inf, 0, ..., 0] in one addmm gives the same bits as
        # the product with column 0 then set to -inf in place, whose backward copied the whole [M, N+1] gradient
        # (issue 10; tests/test_perf_distill_ops.py)
        W = model.item_emb.weight
        pad = torch.zeros(W.shape[0], dtype=h.dtype, device=h.device)
        pad[0] = float("-inf")
        return F.cross_entropy(torch.addmm(pad, h, W.T), t)
    neg = torch.randint(1, model.config.n_items + 1, (len(t), n_neg), generator=gen)
    pos_s = (h * model.item_emb(t)).sum(-1)
    neg_s = torch.einsum("md,mnd->mn", h, model.item_emb(neg))
    return F.binary_cross_entropy_with_logits(pos_s, torch.ones_like(pos_s)) + \
        F.binary_cross_entropy_with_logits(neg_s, torch.zeros_like(neg_s))


def split_inputs(prepared: Prepared, split: Literal["valid", "test"]) -> tuple[list[np.ndarray], np.ndarray]:
    """Histories and targets: valid sees train; test sees train + the validation item."""
    if split == "valid":
        return prepared.train, prepared.valid
    return [np.append(t, v) for t, v in zip(prepared.train, prepared.valid)], prepared.test


@torch.no_grad()
def rank_targets(model: SASRec, histories: list[np.ndarray], targets: np.ndarray,
                 masked: bool = False, batch: int = 512) -> np.ndarray:
    """Full ranking over all items: 0-based rank of each target."""
    was = model.training
    model.eval()
    L = model.config.max_len
    out = []
    for i in range(0, len(histories), batch):
        seqs = left_pad(histories[i:i + batch], L)
        scores = model.score_all(model.user_embedding(seqs))
        tg = torch.as_tensor(targets[i:i + batch])
        if masked:  # mask the whole history, not only the last L items
            full = left_pad(histories[i:i + batch], max(len(h) for h in histories[i:i + batch]))
            out.append(masked_target_ranks(scores, tg, full).numpy())
        else:
            out.append(target_ranks(scores, tg).numpy())
    model.train(was)
    return np.concatenate(out)


def evaluate(model: SASRec, prepared: Prepared, split: Literal["valid", "test"], masked: bool = False) -> dict[str, float]:
    h, t = split_inputs(prepared, split)
    return summarize(rank_targets(model, h, t, masked))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's thread count set to n inside the block (None or 0: unchanged)."""
    was = torch.get_num_threads()
    if not n or n == was:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def _branch_grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor | None]:
    """d loss / d params (None for a parameter the loss does not reach, or for a constant loss: every weight 0)."""
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _add_grads(params: list[nn.Parameter], *branches: list[Tensor | None]) -> None:
    """p.grad = the branches' gradients summed in the order given (a fixed order: the same bits every run)."""
    for i, p in enumerate(params):
        g = None
        for gs in branches:
            if gs[i] is not None:
                g = gs[i] if g is None else g + gs[i]
        p.grad = g


class MaskFeed:
    """The baseline's dropout masks drawn ahead in a helper thread, in the order the training steps ask for them
    (issue 10: the baseline trains on one core; drawing its masks, a serial Mersenne-twister loop in float64,
    took 7% of a step's operator time in a profile, more with the compare and the cast).

    Every mask of a training step comes from torch's default generator through sasrec.dropout, and nothing
    else draws from it while the feed runs, so a helper that draws the same shapes in the same order yields the
    same masks and leaves the generator where the steps alone would. The first step runs with its draws made in
    place and recorded (the shapes, with dim 0 the step's batch size); the helper then replays that record step
    after step with each step's batch size (`sizes`, the same in every epoch), at most `depth` steps ahead. Each
    mask handed out is checked against the shape, dtype and p asked for, and a step must use all of its masks:
    anything else raises instead of training on other masks. close() stops the helper and puts the generator
    back to its state before the first step drawn but not trained on, so a stop at any step leaves it as the
    plain loop would.
    """

    def __init__(self, sizes: list[int], depth: int = 2):
        self.sizes, self.depth = sizes, depth
        self.tape: list[tuple[tuple[int, ...], torch.dtype, float]] | None = None
        self.off = False  # a record the helper cannot replay (a draw whose dim 0 is not the batch): draw in place
        self.recording: list[tuple[tuple[int, ...], torch.dtype, float]] | None = None
        self.current: deque = deque()
        self.states: deque = deque()  # the generator's state before each step drawn ahead and not yet trained on
        self.q: queue.Queue = queue.Queue(depth)
        self.halt = threading.Event()
        self.thread: threading.Thread | None = None
        self.k = 0  # the index of the next step, counted over epochs

    def take(self, shape: torch.Size, dtype: torch.dtype, p: float) -> Tensor:
        if self.recording is not None:
            self.recording.append((tuple(shape), dtype, p))
            return sasrec.draw_mask(shape, dtype, p)
        if not self.current:
            raise RuntimeError(f"step {self.k}: a dropout mask {tuple(shape)} beyond those the first step drew; "
                               "the masks drawn ahead would differ (a bug: please report it)")
        want, mask = self.current.popleft()
        if want != (tuple(shape), dtype, p):
            raise RuntimeError(f"step {self.k}: a dropout mask {(tuple(shape), dtype, p)} asked for where the first "
                               f"step drew {want} (a bug: please report it)")
        return mask

    def _draw(self, start: int) -> None:
        k = start
        try:
            while not self.halt.is_set():
                b = self.sizes[k % len(self.sizes)]
                self.states.append(torch.default_generator.get_state())
                masks = [(((b,) + s[1:]), d, p) for s, d, p in self.tape]
                item = (k, [(m, sasrec.draw_mask(m[0], m[1], m[2])) for m in masks])
                while not self.halt.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                k += 1
        except BaseException as e:  # handed to the training thread, which raises it
            self.q.put((None, e))

    @contextlib.contextmanager
    def step(self):
        """One training step: its masks installed for this thread's sasrec.dropout."""
        b = self.sizes[self.k % len(self.sizes)]
        if self.off:
            yield
            self.k += 1
            return
        if self.tape is None:
            self.recording = []
        else:
            k, masks = self.q.get()
            if k is None:
                raise RuntimeError("drawing dropout masks ahead failed") from masks
            if k != self.k:
                raise RuntimeError(f"the masks drawn for step {k} handed to step {self.k} (a bug: please report it)")
            self.current = deque(masks)
        sasrec.MASKS.feed = self
        try:
            yield
        finally:
            sasrec.MASKS.feed = None
        if self.tape is None:
            rec, self.recording = self.recording, None
            if any(s[0] != b for s, _, _ in rec):
                self.off = True
                log.info("dropout masks drawn in place: a mask's first dimension is not the batch's")
            else:
                self.tape = rec
                self.thread = threading.Thread(target=self._draw, args=(self.k + 1,), name="dropout-masks", daemon=True)
                self.thread.start()
        else:
            self.states.popleft()
            if self.current:
                raise RuntimeError(f"step {self.k} used {len(masks) - len(self.current)} of the {len(masks)} dropout "
                                   "masks drawn for it (a bug: please report it)")
        self.k += 1

    def close(self) -> None:
        if self.thread is None:
            return
        self.halt.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.q.get(timeout=0.05)
        self.thread.join()
        if self.states:  # drawn ahead and not trained on: undo those draws
            torch.default_generator.set_state(self.states[0])
        self.thread = None


def fit(model: SASRec, prepared: Prepared, cfg: TrainConfig, objective: Objective | None = None,
        show_progress: bool = True, concurrent: bool = False, draw_ahead: bool = False,
        eval_threads: int | None = None) -> FitResult:
    """Train with early stopping on validation NDCG@10.

    An objective with `own_rng = True` (the distillation: its pass draws no random number from torch's
    default generator) is a branch of its own: the next-item loss and the objective's loss are each
    differentiated alone and their gradients summed (next-item first), so the result is the same whether
    `concurrent` runs the objective's branch in a second thread, beside the next-item branch, or not
    (issue 10: a distilled step on two cores in about the time of a baseline step on one). Any other
    objective is added to the loss and differentiated with it, as before.

    draw_ahead (without an objective): the dropout masks are drawn by a helper thread a step or two ahead
    (MaskFeed), the same masks in the same order, so the result is the same as without it. eval_threads: torch
    threads for each epoch's validation, which gives the same ranks on any number (the training threads are
    idle then).

    The model and the objective's parameters (the distillation projector) both end with the best
    epoch's values, so a checkpoint pairs weights of one epoch. A diverged epoch (non-finite
    training loss, or NaN/+inf validation scores) is never kept: NaN weights do not recover, so
    training stops there with the best earlier epoch restored and `diverged_epoch` set. If no
    earlier epoch was finite there is nothing to keep: UsageError.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    X, Y = (torch.from_numpy(a) for a in training_windows(prepared.train, model.config.max_len, cfg.stride))
    extra = list(objective.parameters()) if objective else []
    # foreach: the same arithmetic as the per-parameter loop torch uses by default on a CPU, bit for bit, in fewer
    # dispatches (issue 10; sasrec.FAST_TRAIN_OPS off gives the loop). fused=True would be faster still but rounds
    # differently: not taken.
    opt = torch.optim.Adam(list(model.parameters()) + extra, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           foreach=True if sasrec.FAST_TRAIN_OPS else None)
    steps = (len(X) + cfg.batch_size - 1) // cfg.batch_size
    result, best, best_state, best_extra, step, stale = FitResult(best_epoch=0), -1.0, None, None, 0, 0
    branches = objective is not None and getattr(objective, "own_rng", False)
    params = list(model.parameters()) + extra
    pool = ThreadPoolExecutor(1, thread_name_prefix="objective") if branches and concurrent else None
    feed = None
    if draw_ahead and objective is None and sasrec.FAST_TRAIN_OPS:
        feed = MaskFeed([min(cfg.batch_size, len(X) - b * cfg.batch_size) for b in range(steps)])

    def objective_branch(at_step: int):
        l_extra, extra_logs = objective.loss(model, at_step)
        return l_extra.detach(), extra_logs, _branch_grads(l_extra, params)

    with _progress() as prog, (pool or contextlib.nullcontext()), \
            (contextlib.closing(feed) if feed else contextlib.nullcontext()):
        task = prog.add_task("train", total=steps, info="", visible=show_progress)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.from_numpy(rng.permutation(len(X)))
            prog.reset(task, total=steps, description=f"epoch {epoch}")
            sums: dict[str, float] = {}
            diverged, done = "", 0
            for b in range(steps):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                logs: dict[str, float] = {}
                loss = torch.zeros(())
                if branches:  # each branch differentiated alone, the objective's maybe in the second thread
                    fut = pool.submit(objective_branch, step) if pool else None
                    g_rec: list[Tensor | None] = [None] * len(params)
                    if cfg.w_rec > 0:
                        l_rec = next_item_loss(model, X[idx], Y[idx], cfg.loss, cfg.n_neg, gen)
                        g_rec = _branch_grads(cfg.w_rec * l_rec, params)
                        loss = loss + cfg.w_rec * l_rec.detach()
                        logs["loss_rec"] = l_rec.item()
                    l_extra, extra_logs, g_extra = fut.result() if fut else objective_branch(step)
                    loss = loss + l_extra
                    logs.update(extra_logs)
                else:
                    with feed.step() if feed else contextlib.nullcontext():
                        if cfg.w_rec > 0:
                            l_rec = next_item_loss(model, X[idx], Y[idx], cfg.loss, cfg.n_neg, gen)
                            loss = loss + cfg.w_rec * l_rec
                            logs["loss_rec"] = l_rec.item()
                        if objective is not None:
                            l_extra, extra_logs = objective.loss(model, step)
                            loss = loss + l_extra
                            logs.update(extra_logs)
                logs["loss"] = loss.item()
                if not math.isfinite(logs["loss"]):  # stop before the step spreads it into the weights
                    diverged = f"training loss {logs['loss']} at step {step}"
                    break
                if branches:
                    _add_grads(params, g_rec, g_extra)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                step += 1
                done += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                prog.update(task, advance=1, info=f"loss {logs['loss']:.4f}")
            train_s = time.perf_counter() - t0
            row = {"epoch": epoch, **{k: v / max(1, done) for k, v in sums.items()}, "train_seconds": train_s}
            if objective is not None:
                row.update(objective.end_epoch())
            if not diverged:
                try:
                    with torch_threads(eval_threads):
                        row.update({f"valid_{k}": v for k, v in evaluate(model, prepared, "valid").items()})
                except NonFiniteScores as e:
                    diverged = f"validation scores: {e}"
            if diverged:
                row["diverged"] = diverged
                result.history.append(row)
                result.diverged_epoch = epoch
                if best_state is None:
                    raise UsageError(f"training diverged in epoch {epoch} ({diverged}) before any epoch finished "
                                     "with finite scores; lower --lr")
                log.warning("epoch %d diverged (%s): stopping with epoch %d's weights", epoch, diverged, result.best_epoch)
                break
            result.history.append(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
            if row["valid_ndcg@10"] > best:
                best, result.best_epoch, stale = row["valid_ndcg@10"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                best_extra = [p.detach().clone() for p in extra]
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop at epoch %d (best %d, valid ndcg@10 %.4f)", epoch, result.best_epoch, best)
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
        with torch.no_grad():  # the projector of the same epoch as the weights
            for p, v in zip(extra, best_extra or []):
                p.copy_(v)
    model.eval()
    return result
