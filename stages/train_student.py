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

from pipeline.store.remote import materialize_store, shown
from pipeline.student.checkpoint import invalidate, save_student
from pipeline.student.distill import DistillConfig, DistillObjective, init_from_baseline, open_teacher_store
from pipeline.errors import UsageError
from pipeline.evaluation.metrics import DEFAULT_METRICS, summarize
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.student.train import FitResult, TrainConfig, fit, rank_targets, split_inputs
from stages.outputs import ensure_writable, set_threads, write_text_atomic, writing  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

TIMING_FIELDS = ("train_seconds",)  # per-epoch history fields that measure the machine, not the run
DEFAULT_BASELINE = Path("data/students/baseline")


def timing_path(metrics_path: Path) -> Path:
    """Seconds per epoch, next to the metrics file: outside the checkpoint folder that DVC hashes."""
    return metrics_path.with_name(f"{metrics_path.stem}.timing.json")


def check_calibrate(dcfg: DistillConfig, modes: dict[Path, str | None]) -> None:
    """--calibrate re-ranks by the decision-step identifier scores. A generate-mode store's ranking is
    the generated text, so calibration would silently replace it with another ranking; only the
    scores target (and no rank-based weighting) leaves the generated ranking unused anyway."""
    generated = [str(p) for p, mode in modes.items() if mode == "generate"]
    if not dcfg.calibrate or not generated:
        return
    uses_ranking = [flag for flag, on in (("--teacher-target ranking", dcfg.target == "ranking"),
                                          ("--gamma-position", dcfg.gamma_position > 0),
                                          ("--gamma-agreement", dcfg.gamma_agreement > 0)) if on]
    if uses_ranking:
        raise UsageError(
            f"--calibrate re-ranks candidates by the first-token identifier scores, which would replace the generated "
            f"ranking of {', '.join(generated)} (a generate-mode store) used by {', '.join(uses_ranking)}; drop "
            "--calibrate to learn the generated ranking, or use --teacher-target scores without rank weighting")


def final_report(model: SASRec, prepared: Prepared, out: Path, run_name: str, metrics_path: Path,
                 result: FitResult, settings: dict) -> dict:
    """Evaluate valid/test (unmasked, and with seen items masked), write per-user ranks, history and
    timings; return the metrics, which the caller writes last (after the checkpoint)."""
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
    metrics["diverged_epoch"] = getattr(result, "diverged_epoch", None)  # None: training never diverged
    metrics["epochs_run"] = len(result.history)
    metrics["run"] = run_name
    pl.concat(ranks).write_parquet(out / "ranks.parquet")
    # Wall-clock seconds differ between identical runs: kept out of the hashed checkpoint folder, so
    # two machines running the same stage produce byte-identical outputs (and DVC can share them).
    history = [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in result.history]
    timings = [{"epoch": row["epoch"], **{k: row[k] for k in TIMING_FIELDS if k in row}} for row in result.history]
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    write_text_atomic(timing_path(metrics_path), json.dumps({"run": run_name, "epochs": timings}, indent=1) + "\n")

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
    teacher_cache: Annotated[list[str] | None, typer.Option(help="Teacher store written by `gedistill teacher-dump`: a directory, or its URI (s3://bucket/prefix, file:///abs/dir: downloaded into $GEDISTILL_CACHE/remote, sha256 checked); repeat to train on several stores together; omit for the baseline.")] = None,
    candidates: Annotated[list[Path] | None, typer.Option(help="Candidates file each store was made from (same order), checked by fingerprint. Not given: no candidates check (the rows carry their own candidates; the prepared data is always checked).")] = None,
    w_rec: Annotated[float, typer.Option(min=0.0, help="Weight of the next-item loss; 0 with a teacher = the source method (L_rank + lambda L_emb).")] = 1.0,
    w_rank: Annotated[float, typer.Option(min=0.0, help="Weight of the ListNet loss on the teacher's K candidates.")] = DistillConfig.w_rank,
    lambda_emb: Annotated[float, typer.Option(min=0.0, help="Weight of the embedding loss d(W_p(h_dec), u_sas).")] = DistillConfig.lambda_emb,
    emb_loss: Annotated[str, typer.Option(help="mse (the source), cosine or standardized.")] = DistillConfig.emb_loss,
    teacher_target: Annotated[str, typer.Option(help="ranking: softmax(-rank/T); scores: softmax(identifier logits/T).")] = DistillConfig.target,
    teacher_temperature: Annotated[float, typer.Option(min=1e-6, help="T of the teacher target.")] = DistillConfig.temperature,
    gamma_position: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec rank-position weighting (0 = off).")] = DistillConfig.gamma_position,
    gamma_confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec teacher-confidence weighting (0 = off).")] = DistillConfig.gamma_confidence,
    gamma_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="DLLM2Rec teacher-student agreement weighting (0 = off).")] = DistillConfig.gamma_agreement,
    calibrate: Annotated[bool, typer.Option(help="Remove the teacher's position bias: subtract each identifier position's mean score, re-rank (first-token stores; with a generate-mode store only with --teacher-target scores).")] = DistillConfig.calibrate,
    teacher_batch_size: Annotated[int, typer.Option(min=2, help="Teacher samples drawn per optimizer step.")] = DistillConfig.teacher_batch_size,
    buffer_rows: Annotated[int, typer.Option(min=2, help="Shuffle buffer over the store, in rows (bounds memory).")] = DistillConfig.buffer_rows,
    init: Annotated[str, typer.Option(help="scratch, or baseline: start from --baseline's weights (with --teacher-cache).")] = DistillConfig.init,
    baseline: Annotated[Path, typer.Option(help="Baseline checkpoint for --init baseline.")] = DEFAULT_BASELINE,
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
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default. On 2 or more a second thread runs "
                                                   "the teacher branch (distilling) or draws the dropout masks (baseline): 2 gives 1's result, faster.")] = 0,
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
    # Options that only shape distillation: given without a store they would be accepted and ignored.
    teacher_only = {
        "--candidates": (cands_in, []), "--w-rank": (w_rank, DistillConfig.w_rank),
        "--lambda-emb": (lambda_emb, DistillConfig.lambda_emb), "--emb-loss": (emb_loss, DistillConfig.emb_loss),
        "--teacher-target": (teacher_target, DistillConfig.target),
        "--teacher-temperature": (teacher_temperature, DistillConfig.temperature),
        "--gamma-position": (gamma_position, DistillConfig.gamma_position),
        "--gamma-confidence": (gamma_confidence, DistillConfig.gamma_confidence),
        "--gamma-agreement": (gamma_agreement, DistillConfig.gamma_agreement),
        "--calibrate": (calibrate, DistillConfig.calibrate),
        "--teacher-batch-size": (teacher_batch_size, DistillConfig.teacher_batch_size),
        "--buffer-rows": (buffer_rows, DistillConfig.buffer_rows), "--init": (init, DistillConfig.init),
        "--baseline": (baseline, DEFAULT_BASELINE),
    }
    given = [flag for flag, (value, default) in teacher_only.items() if value != default]
    if not stores_in and given:
        raise UsageError(f"{', '.join(given)} only apply to distillation from a teacher store; add --teacher-cache "
                         "STORE, or drop them to train the baseline")
    if baseline != DEFAULT_BASELINE and init != "baseline":
        raise UsageError("--baseline is read only with --init baseline; add --init baseline or drop --baseline")
    if cands_in and len(cands_in) != len(stores_in):
        raise typer.BadParameter(f"{len(cands_in)} --candidates for {len(stores_in)} --teacher-cache: give one per store, in order")
    if stores_in and w_rec == 0 and w_rank == 0 and lambda_emb == 0:
        raise typer.BadParameter("--w-rec, --w-rank and --lambda-emb are all 0: nothing to train")
    if not stores_in and w_rec == 0:
        raise typer.BadParameter("--w-rec 0 without --teacher-cache leaves nothing to train")
    run = run_name or ("distilled" if stores_in else "baseline")
    out = out or Path("data/students") / run
    metrics_path = metrics or Path("data/metrics") / f"{run}.json"
    data = load_prepared(prepared)
    ensure_writable(out, metrics_path.parent)
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
        # No --candidates: no check against a file the user did not name (a default path in the
        # working directory may belong to another project or an older retrieval).
        stores = [open_teacher_store(materialize_store(st), data, c) for st, c in zip(stores_in, cands_in or [None] * len(stores_in))]
        shapes = {(st.hidden_size, st.k) for st in stores}
        if len(shapes) > 1:
            raise UsageError(f"the teacher stores differ in (h_dec width, K): {sorted(shapes)}; train on stores of one teacher and K")
        check_calibrate(dcfg, {shown(p): st.settings.get("mode") for p, st in zip(stores_in, stores)})
        if init == "baseline":
            init_from_baseline(model, baseline, data)
        objective = DistillObjective(dcfg, data, [p for st in stores for p in st.shard_paths], hidden, max_len)
    # On two threads or more, distillation runs its teacher branch beside the next-item branch, each on half the
    # threads; the baseline draws its dropout masks in a helper thread and trains on the others. Either way 1 and
    # 2 threads give the same bits (one training thread), and validation uses all of them (train.fit).
    n_threads = torch.get_num_threads()  # --threads, or torch's default for 0
    concurrent = objective is not None and n_threads >= 2
    draw_ahead = objective is None and n_threads >= 2
    if concurrent or draw_ahead:
        torch.set_num_threads(n_threads // 2 if concurrent else n_threads - 1)
    log.info("training %s on %d users, %d items (threads=%d%s)", run, data.n_users, data.n_items, torch.get_num_threads(),
             ", the teacher branch in a second thread" if concurrent else
             ", dropout masks drawn ahead in a second thread" if draw_ahead else "")
    result = fit(model, data, tcfg, objective=objective, show_progress=os.environ.get("GEDISTILL_NO_PROGRESS") is None,
                 concurrent=concurrent, draw_ahead=draw_ahead, eval_threads=n_threads)
    torch.set_num_threads(n_threads)
    out.mkdir(parents=True, exist_ok=True)
    # An older checkpoint in `out` stops being loadable before any of its files is replaced, so a write
    # that fails half-way never leaves old weights beside new ranks; the metrics file comes last.
    metrics_path.unlink(missing_ok=True)  # a kill after the new checkpoint must not leave the old run's metrics
    invalidate(out)
    distill_meta = {"distill": asdict(dcfg), "teacher_cache": [shown(p) for p in stores_in]} if dcfg else {}
    with writing(out):
        report = final_report(model, data, out, run, metrics_path, result,
                              {"sasrec": asdict(cfg), "train": asdict(tcfg), **distill_meta})
        save_student(out, model, {"run": run, "prepared_fingerprint": data.fingerprint, "train": asdict(tcfg),
                                  "best_epoch": result.best_epoch, **distill_meta},
                     extra_tensors={f"projector.{k}": v for k, v in objective.projector.state_dict().items()} if objective else None)
    with writing(metrics_path):
        write_text_atomic(metrics_path, json.dumps(report, indent=2) + "\n")
