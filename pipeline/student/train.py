"""The student's training loop: next-item loss over every prefix, optional extra objective, early stopping."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
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


def fit(model: SASRec, prepared: Prepared, cfg: TrainConfig, objective: Objective | None = None,
        show_progress: bool = True, concurrent: bool = False) -> FitResult:
    """Train with early stopping on validation NDCG@10.

    An objective with `own_rng = True` (the distillation: its pass draws no random number from torch's
    default generator) is a branch of its own: the next-item loss and the objective's loss are each
    differentiated alone and their gradients summed (next-item first), so the result is the same whether
    `concurrent` runs the objective's branch in a second thread, beside the next-item branch, or not
    (issue 10: a distilled step on two cores in about the time of a baseline step on one). Any other
    objective is added to the loss and differentiated with it, as before.

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

    def objective_branch(at_step: int):
        l_extra, extra_logs = objective.loss(model, at_step)
        return l_extra.detach(), extra_logs, _branch_grads(l_extra, params)

    with _progress() as prog, (pool or contextlib.nullcontext()):
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
