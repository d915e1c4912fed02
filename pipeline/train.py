"""The student's training loop: next-item loss over every prefix, optional extra objective, early stopping."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from pipeline.metrics import mask_seen, summarize, target_ranks
from pipeline.prepared import Prepared
from pipeline.sasrec import SASRec
from pipeline.sequences import left_pad, training_windows

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


def next_item_loss(model: SASRec, x: Tensor, y: Tensor, kind: str, n_neg: int, gen: torch.Generator) -> Tensor:
    """x, y [B, L]; loss over positions with a target (y != 0)."""
    h = model.encode(x)[y != 0]  # [M, D]
    t = y[y != 0]  # [M]
    if kind == "ce":
        logits = h @ model.item_emb.weight.T  # [M, N+1]
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, t)
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
        if masked:  # mask the whole history, not only the last L items
            full = left_pad(histories[i:i + batch], max(len(h) for h in histories[i:i + batch]))
            mask_seen(scores, full)
        out.append(target_ranks(scores, torch.as_tensor(targets[i:i + batch])).numpy())
    model.train(was)
    return np.concatenate(out)


def evaluate(model: SASRec, prepared: Prepared, split: Literal["valid", "test"], masked: bool = False) -> dict[str, float]:
    h, t = split_inputs(prepared, split)
    return summarize(rank_targets(model, h, t, masked))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def fit(model: SASRec, prepared: Prepared, cfg: TrainConfig, objective: Objective | None = None,
        show_progress: bool = True) -> FitResult:
    """Train with early stopping on validation NDCG@10; the model ends with its best weights."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    X, Y = (torch.from_numpy(a) for a in training_windows(prepared.train, model.config.max_len, cfg.stride))
    params = list(model.parameters()) + (list(objective.parameters()) if objective else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = (len(X) + cfg.batch_size - 1) // cfg.batch_size
    result, best, best_state, step, stale = FitResult(best_epoch=0), -1.0, None, 0, 0
    with _progress() as prog:
        task = prog.add_task("train", total=steps, info="", visible=show_progress)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.from_numpy(rng.permutation(len(X)))
            prog.reset(task, total=steps, description=f"epoch {epoch}")
            sums: dict[str, float] = {}
            for b in range(steps):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                logs: dict[str, float] = {}
                loss = torch.zeros(())
                if cfg.w_rec > 0:
                    l_rec = next_item_loss(model, X[idx], Y[idx], cfg.loss, cfg.n_neg, gen)
                    loss = loss + cfg.w_rec * l_rec
                    logs["loss_rec"] = l_rec.item()
                if objective is not None:
                    l_extra, extra_logs = objective.loss(model, step)
                    loss = loss + l_extra
                    logs.update(extra_logs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                logs["loss"] = loss.item()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                prog.update(task, advance=1, info=f"loss {logs['loss']:.4f}")
            train_s = time.perf_counter() - t0
            row = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}, "train_seconds": train_s}
            if objective is not None:
                row.update(objective.end_epoch())
            row.update({f"valid_{k}": v for k, v in evaluate(model, prepared, "valid").items()})
            result.history.append(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
            if row["valid_ndcg@10"] > best:
                best, result.best_epoch, stale = row["valid_ndcg@10"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop at epoch %d (best %d, valid ndcg@10 %.4f)", epoch, result.best_epoch, best)
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
