"""`gedistill student-train`: SASRec on the prepared sequences; with --teacher-cache, distilled from a teacher store."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
import torch
import typer
from rich.console import Console
from rich.table import Table

from pipeline.checkpoint import save_student
from pipeline.distill import DistillConfig, DistillObjective, init_from_baseline, open_teacher_store
from pipeline.errors import UsageError
from pipeline.metrics import DEFAULT_METRICS, summarize
from pipeline.prepared import Prepared, load_prepared
from pipeline.sasrec import SASRec, SasrecConfig
from pipeline.train import FitResult, TrainConfig, fit, rank_targets, split_inputs

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """0 keeps torch's default. On a shared machine, spin-waiting threads fight (DESIGN.md point 11)."""
    if threads > 0:
        torch.set_num_threads(threads)


def final_report(model: SASRec, prepared: Prepared, out: Path, run_name: str, metrics_path: Path,
                 result: FitResult, settings: dict) -> dict:
    """Evaluate valid/test (unmasked, and with seen items masked), write metrics JSON + per-user ranks."""
    metrics: dict = {}
    ranks = []
    for split in ("valid", "test"):
        h, t = split_inputs(prepared, split)
        for masked in (False, True):
            r = rank_targets(model, h, t, masked=masked)
            metrics[f"{split}_masked" if masked else split] = summarize(r)
            ranks.append(pl.DataFrame({"user_idx": np.arange(len(r), dtype=np.int32), "split": split,
                                       "masked": masked, "rank": r.astype(np.int32)}))
    metrics["best_epoch"] = result.best_epoch
    metrics["epochs_run"] = len(result.history)
    metrics["run"] = run_name
    pl.concat(ranks).write_parquet(out / "ranks.parquet")
    (out / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")

    table = Table(title=f"{run_name}: full ranking over {prepared.n_items:,} items, {prepared.n_users:,} users")
    table.add_column("split")
    for m in DEFAULT_METRICS:
        table.add_column(m, justify="right")
    for key in ("valid", "test", "valid_masked", "test_masked"):
        table.add_row(key.replace("_masked", " (seen masked)"), *(f"{metrics[key][m]:.4f}" for m in DEFAULT_METRICS))
    Console().print(table)
    return metrics


def student_train(
    prepared: Annotated[Path, typer.Option(help="Folder written by `gedistill prepare`.")] = Path("data/prepared"),
    out: Annotated[Path | None, typer.Option(help="Checkpoint folder. Default: data/students/<run-name>.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Names the run's files. Default: 'baseline', or 'distilled' with --teacher-cache.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON for DVC. Default: data/metrics/<run-name>.json.")] = None,
    teacher_cache: Annotated[list[Path] | None, typer.Option(help="Teacher store written by `gedistill teacher-dump`; repeat to train on several stores together; omit for the baseline.")] = None,
    candidates: Annotated[list[Path] | None, typer.Option(help="Candidates file each store was made from (same order), checked by fingerprint. Default, for one store: data/candidates/candidates.parquet when it exists.")] = None,
    w_rec: Annotated[float, typer.Option(min=0.0, help="Weight of the next-item loss; 0 with a teacher = the source method (L_rank + lambda L_emb).")] = 1.0,
    w_rank: Annotated[float, typer.Option(min=0.0, help="Weight of the ListNet loss on the teacher's K candidates.")] = 1.0,
    lambda_emb: Annotated[float, typer.Option(min=0.0, help="Weight of the embedding loss d(W_p(h_dec), u_sas).")] = 1.0,
    emb_loss: Annotated[str, typer.Option(help="mse (the source), cosine or standardized.")] = "cosine",
    teacher_target: Annotated[str, typer.Option(help="ranking: softmax(-rank/T); scores: softmax(identifier logits/T).")] = "ranking",
    teacher_temperature: Annotated[float, typer.Option(min=1e-6, help="T of the teacher target.")] = 1.0,
    gamma_position: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec rank-position weighting (0 = off).")] = 0.0,
    gamma_confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec teacher-confidence weighting (0 = off).")] = 0.0,
    gamma_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec teacher-student agreement weighting (0 = off).")] = 0.0,
    calibrate: Annotated[bool, typer.Option(help="Remove the teacher's position bias: subtract each identifier position's mean score, re-rank.")] = False,
    teacher_batch_size: Annotated[int, typer.Option(min=2, help="Teacher samples drawn per optimizer step.")] = 32,
    buffer_rows: Annotated[int, typer.Option(min=2, help="Shuffle buffer over the store, in rows (bounds memory).")] = 4096,
    init: Annotated[str, typer.Option(help="scratch, or baseline: start from --baseline's weights.")] = "scratch",
    baseline: Annotated[Path, typer.Option(help="Baseline checkpoint for --init baseline.")] = Path("data/students/baseline"),
    hidden: Annotated[int, typer.Option(min=8)] = SasrecConfig.hidden,
    blocks: Annotated[int, typer.Option(min=1)] = SasrecConfig.n_blocks,
    heads: Annotated[int, typer.Option(min=1)] = SasrecConfig.n_heads,
    max_len: Annotated[int, typer.Option(min=2, help="History length the model sees.")] = SasrecConfig.max_len,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.95)] = SasrecConfig.dropout,
    loss: Annotated[str, typer.Option(help="ce: softmax over all items; bce: sampled negatives.")] = "ce",
    epochs: Annotated[int, typer.Option(min=1)] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Training windows per step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(min=0.0)] = TrainConfig.lr,
    patience: Annotated[int, typer.Option(min=1, help="Early stopping on validation NDCG@10.")] = TrainConfig.patience,
    stride: Annotated[int | None, typer.Option(min=1, help="Window step over long sequences (default max-len).")] = None,
    seed: Annotated[int, typer.Option()] = TrainConfig.seed,
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default.")] = 0,
) -> None:
    """Train SASRec with full-softmax CE (or BCE), early stopping on validation NDCG@10, and report metrics."""
    if loss not in ("ce", "bce"):
        raise typer.BadParameter(f"--loss must be ce or bce, not {loss!r}")
    if hidden % heads:
        raise typer.BadParameter(f"--hidden {hidden} must be divisible by --heads {heads}")
    if stride is not None and stride > max_len:
        raise typer.BadParameter(f"--stride {stride} must be at most --max-len {max_len}")
    set_threads(threads)
    stores_in = list(teacher_cache or [])
    cands_in = list(candidates or [])
    if cands_in and len(cands_in) != len(stores_in):
        raise typer.BadParameter(f"{len(cands_in)} --candidates for {len(stores_in)} --teacher-cache: give one per store, in order")
    run = run_name or ("distilled" if stores_in else "baseline")
    out = out or Path("data/students") / run
    metrics_path = metrics or Path("data/metrics") / f"{run}.json"
    data = load_prepared(prepared)
    cfg = SasrecConfig(n_items=data.n_items, hidden=hidden, n_blocks=blocks, n_heads=heads, max_len=max_len,
                       dropout=dropout, attn_dropout=dropout)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,  # type: ignore[arg-type]
                       stride=stride, patience=patience, seed=seed, w_rec=w_rec)
    torch.manual_seed(seed)
    model = SASRec(cfg)
    objective, dcfg = None, None
    if stores_in:
        dcfg = DistillConfig(w_rank=w_rank, lambda_emb=lambda_emb, emb_loss=emb_loss, target=teacher_target,  # type: ignore[arg-type]
                             temperature=teacher_temperature, gamma_position=gamma_position,
                             gamma_confidence=gamma_confidence, gamma_agreement=gamma_agreement,
                             calibrate=calibrate, teacher_batch_size=teacher_batch_size, buffer_rows=buffer_rows,
                             init=init, seed=seed)  # type: ignore[arg-type]
        if w_rec == 0 and w_rank == 0 and lambda_emb == 0:
            raise typer.BadParameter("--w-rec, --w-rank and --lambda-emb are all 0: nothing to train")
        default_cands = Path("data/candidates/candidates.parquet")
        if not cands_in:
            cands_in = [default_cands if len(stores_in) == 1 and default_cands.is_file() else None] * len(stores_in)
        stores = [open_teacher_store(st, data, c) for st, c in zip(stores_in, cands_in)]
        shapes = {(st.hidden_size, st.k) for st in stores}
        if len(shapes) > 1:
            raise UsageError(f"the teacher stores differ in (h_dec width, K): {sorted(shapes)}; train on stores of one teacher and K")
        if init == "baseline":
            init_from_baseline(model, baseline, data)
        objective = DistillObjective(dcfg, data, [p for st in stores for p in st.shard_paths], hidden, max_len)
    elif w_rec == 0:
        raise typer.BadParameter("--w-rec 0 without --teacher-cache leaves nothing to train")
    log.info("training %s on %d users, %d items (threads=%d)", run, data.n_users, data.n_items, torch.get_num_threads())
    result = fit(model, data, tcfg, objective=objective, show_progress=os.environ.get("GEDISTILL_NO_PROGRESS") is None)
    out.mkdir(parents=True, exist_ok=True)
    distill_meta = {"distill": asdict(dcfg), "teacher_cache": [str(p) for p in stores_in]} if dcfg else {}
    save_student(out, model, {"run": run, "prepared_fingerprint": data.fingerprint, "train": asdict(tcfg),
                              "best_epoch": result.best_epoch, **distill_meta},
                 extra_tensors={f"projector.{k}": v for k, v in objective.projector.state_dict().items()} if objective else None)
    final_report(model, data, out, run, metrics_path, result,
                 {"sasrec": asdict(cfg), "train": asdict(tcfg), **distill_meta})
