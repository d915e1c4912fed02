"""`gedistill evaluate`: baseline vs distilled on the same test users, and how good the teacher was.

Reads checkpoints, the prepared data and (optionally) the teacher store; never an LLM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from pipeline.student.checkpoint import load_student
from pipeline.student.distill import position_mean_scores
from pipeline.errors import UsageError
from pipeline.evaluation.metrics import DEFAULT_METRICS, per_user
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.student.sasrec import SASRec
from pipeline.data.sequences import left_pad
from pipeline.evaluation.stats import PairedDiff, paired_bootstrap
from pipeline.store import iter_batches, open_store
from pipeline.store.remote import materialize_store, shown
from pipeline.evaluation.teacher_quality import TeacherQuality
from pipeline.student.train import rank_targets, split_inputs
from stages.outputs import ensure_writable, write_text_atomic, writing

log = logging.getLogger(__name__)


def _load(folder: Path, prepared: Prepared) -> tuple[SASRec, dict]:
    model, meta = load_student(folder)
    if meta.get("prepared_fingerprint") != prepared.fingerprint:
        raise UsageError(f"{folder} was trained on other prepared data; pass the --prepared it was trained on")
    return model, meta


def _describe(meta: dict) -> str:
    """A short label of the losses a checkpoint was trained with, e.g. 'w_rec=0, mse, lambda=1'."""
    d = meta.get("distill")
    if not d:
        return ""
    w_rec = meta.get("train", {}).get("w_rec", 1.0)
    return f"w_rec={w_rec:g}, w_rank={d['w_rank']:g}, {d['emb_loss']} x {d['lambda_emb']:g}"


def _history(folder: Path) -> list[dict]:
    p = folder / "history.json"
    return json.loads(p.read_text()) if p.is_file() else []


def compare_students(models: dict[str, SASRec], prepared: Prepared, masked: bool, n_boot: int, seed: int
                     ) -> dict[str, PairedDiff]:
    """Per-user test metrics of both models on the same users, paired bootstrap of the difference."""
    hist, targets = split_inputs(prepared, "test")
    (a, ma), (b, mb) = models.items()
    ra, rb = rank_targets(ma, hist, targets, masked=masked), rank_targets(mb, hist, targets, masked=masked)
    return {m: paired_bootstrap(per_user(ra, m), per_user(rb, m), n_boot=n_boot, seed=seed) for m in DEFAULT_METRICS}


def open_teacher_stores(stores: list[Path], prepared: Prepared) -> list:
    """Verify every store (whole, and row by row against the prepared data) before any student is scored."""
    infos = [open_store(st, checksums=True, prepared=prepared) for st in stores]
    for st, info in zip(stores, infos):
        if info.settings.get("prepared_fingerprint") != prepared.fingerprint:
            raise UsageError(f"{st} was made from other prepared data than the students were trained on")
    if len({info.k for info in infos}) > 1:
        raise UsageError("the teacher stores differ in K; evaluate them one at a time")
    return infos


@torch.no_grad()
def teacher_quality(infos: list, prepared: Prepared, models: dict[str, SASRec], max_rows: int = 0) -> TeacherQuality:
    """Stream the stores; score each sample's candidates with every student (history = train[:position])."""
    shards = [p for info in infos for p in info.shard_paths]
    # the teacher's scores minus each identifier position's mean: its ranking without position bias
    calib = position_mean_scores(shards)
    acc = TeacherQuality(int(infos[0].k), ("teacher_calibrated", *models))
    cols = ["user_idx", "position", "target", "candidates", "ranking", "scores", "status"]
    seen = 0
    batches = (rb for info in infos for rb in iter_batches(info, columns=cols, batch_rows=1024))
    for rb in batches:
        if max_rows and seen >= max_rows:
            break
        rb = rb.slice(0, max_rows - seen) if max_rows else rb
        seen += rb.num_rows
        n, k = rb.num_rows, acc.k
        cands = rb.column("candidates").flatten().to_numpy(zero_copy_only=False).reshape(n, k).astype(np.int64)
        ranking = rb.column("ranking").flatten().to_numpy(zero_copy_only=False).reshape(n, k).astype(np.int64)
        users = rb.column("user_idx").to_numpy(zero_copy_only=False)
        pos = rb.column("position").to_numpy(zero_copy_only=False)
        scores = {"teacher_calibrated": rb.column("scores").flatten().to_numpy(zero_copy_only=False).reshape(n, k) - calib}
        for name, model in models.items():
            model.eval()
            seqs = left_pad([prepared.train[u][:p] for u, p in zip(users, pos)], model.config.max_len)
            scores[name] = model.score_items(model.user_embedding(seqs), torch.from_numpy(cands)).numpy()
        acc.update(cands, ranking, rb.column("target").to_numpy(zero_copy_only=False).astype(np.int64),
                   np.asarray(rb.column("status").to_pylist(), dtype=object), scores)
    return acc


def _print(diffs: dict[str, PairedDiff], names: tuple[str, str], teacher: dict | None, masked: bool) -> None:
    a, b = names
    t = Table(title=f"test ({next(iter(diffs.values())).n_users:,} users, full ranking"
                    f"{', seen items masked' if masked else ''}): {b} vs {a}")
    for col in ("metric", a, b, "diff", "95% CI of diff", "significant"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for m, d in diffs.items():
        t.add_row(m, f"{d.mean_a:.4f}", f"{d.mean_b:.4f}", f"{d.diff:+.4f}", f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
                  "yes" if d.significant else "no")
    console = Console()
    console.print(t)
    if teacher:
        tt = Table(title=f"teacher on its own candidate sets ({teacher['samples']:,} samples, K={teacher['k']})")
        for col in ("ranker", "NDCG@K (target present)", "HR@1", "mean rank"):
            tt.add_column(col, justify="left" if col == "ranker" else "right")
        for name in ("teacher", "teacher_calibrated", a, b):
            r = teacher[name]
            tt.add_row(name, f"{r['ndcg@k_where_present']:.4f}", f"{r['hr@1_where_present']:.4f}",
                       f"{r['mean_rank_where_present']:.2f}")
        tt.add_row("random order", f"{teacher['random_ndcg@k']:.4f}", f"{1 / teacher['k']:.4f}", f"{(teacher['k'] - 1) / 2:.2f}")
        console.print(tt)
        console.print(f"target among the candidates: {teacher['target_in_candidates']:.1%}; parse failures: "
                      f"{teacher['parse_failure_rate']:.1%} (repaired {teacher['repaired_rate']:.1%}); no decision "
                      f"state (first token no identifier) {teacher.get('no_decision_rate', 0.0):.1%}; cut by the "
                      f"decode budget {teacher.get('cut_rate', 0.0):.1%}; most common "
                      f"top-1 position holds {teacher['top1_most_common_share']:.1%} of first choices "
                      f"(uniform {1 / teacher['k']:.1%}). Students score training prefixes here (in-sample).")


def summary_metrics(diffs: dict[str, PairedDiff], teacher: dict | None, metric: str = "ndcg@10") -> dict:
    """The headline for `dvc metrics show/diff`: one metric's test numbers, its verdict, the teacher against
    random order. Flat and short, so that DVC's table (a column per key, sorted by name) fits in 120 columns;
    the full report is the --metrics file. verdict: better / worse (distilled vs baseline, 95% paired
    bootstrap CI excludes 0) or n.s. (not significant)."""
    d = diffs[metric]
    out = {"baseline": round(d.mean_a, 6), "distilled": round(d.mean_b, 6), "diff": round(d.diff, 6),
           "diff_ci95": f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
           "verdict": ("better" if d.diff > 0 else "worse") if d.significant else "n.s."}
    if teacher is not None:  # NDCG@K of the teacher's ranking where the target is among its K candidates
        out["teacher"] = round(teacher["teacher"]["ndcg@k_where_present"], 6)
        out["random"] = round(teacher["random_ndcg@k"], 6)
    return out


def evaluate(
    prepared: Annotated[Path, typer.Option(help="Folder written by `gedistill prepare`.")] = Path("data/prepared"),
    baseline: Annotated[Path, typer.Option(help="Baseline student checkpoint.")] = Path("data/students/baseline"),
    distilled: Annotated[Path, typer.Option(help="Distilled student checkpoint.")] = Path("data/students/distilled"),
    teacher_cache: Annotated[list[str] | None, typer.Option(help="Teacher store(s) the student was distilled from, for the teacher-quality report: directories or URIs (s3://bucket/prefix, file:///abs/dir).")] = None,
    metrics: Annotated[Path, typer.Option(help="The full report (JSON): every metric, bootstrap details, teacher quality.")] = Path("data/metrics/evaluate.json"),
    summary: Annotated[Path | None, typer.Option(help="Also write the headline (test NDCG@10 of both students, "
                                                      "difference, CI, verdict, teacher vs random) here: the "
                                                      "small metrics file `dvc metrics show` prints.")] = None,
    plots: Annotated[Path, typer.Option(help="Folder for the PNG plots.")] = Path("data/plots"),
    masked: Annotated[bool, typer.Option(help="Mask items the user has already seen (reported under 'test_masked').")] = False,
    n_boot: Annotated[int, typer.Option(min=100, help="Bootstrap resamples of the test users.")] = 2000,
    seed: Annotated[int, typer.Option()] = 0,
    max_teacher_rows: Annotated[int, typer.Option(min=0, help="Teacher samples to score; 0 = all.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default.")] = 0,
) -> None:
    """Compare baseline and distilled students (paired bootstrap CIs) and report the teacher's own quality."""
    if threads > 0:
        torch.set_num_threads(threads)
    data = load_prepared(prepared)
    ensure_writable(metrics.parent, plots, *([summary.parent] if summary is not None else []))
    split_key = "test_masked" if masked else "test"
    # A bad store is refused now, not after minutes of comparing the students.
    infos = open_teacher_stores([materialize_store(s) for s in teacher_cache], data) if teacher_cache else []
    names = ("baseline", "distilled")
    (mb, meta_b), (md, meta_d) = _load(baseline, data), _load(distilled, data)
    models = {"baseline": mb, "distilled": md}
    diffs = compare_students(models, data, masked, n_boot, seed)
    teacher = None
    if teacher_cache:
        teacher = teacher_quality(infos, data, models, max_teacher_rows).result()
    verdicts = {m: d.verdict(*names) for m, d in diffs.items()}
    out = {
        # the key says what it holds: masked numbers never pass for the unmasked ones
        split_key: {n: {m: (d.mean_a if n == "baseline" else d.mean_b) for m, d in diffs.items()} for n in names},
        "difference": {m: d.to_dict() for m, d in diffs.items()},
        "verdict": verdicts,
        "summary": f"NDCG@10: {verdicts['ndcg@10']} ({diffs['ndcg@10'].diff:+.4f}, 95% CI "
                   f"[{diffs['ndcg@10'].ci_low:+.4f}, {diffs['ndcg@10'].ci_high:+.4f}])",
        "settings": {"masked": masked, "n_boot": n_boot, "seed": seed, "baseline": str(baseline),
                     "distilled": str(distilled), "teacher_cache": [shown(p) for p in teacher_cache or []]},
    }
    if teacher is not None:
        out["teacher"] = teacher
    notes = {n: _describe(m) for n, m in (("baseline", meta_b), ("distilled", meta_d))}
    with writing(plots):
        # matplotlib only here: every other command, and `gedistill --help`, loads without it
        from pipeline.evaluation.plots import plot_comparison, plot_teacher, plot_training

        pngs = [plot_training({"baseline": _history(baseline), "distilled": _history(distilled)},
                              plots / "training.png", notes),
                plot_comparison(diffs, plots / "comparison.png")]
        if teacher is not None:
            shares = {n: np.array(teacher[n]["rank_share"]) for n in ("teacher", "teacher_calibrated", *names)}
            pngs.append(plot_teacher(np.array(teacher["top1_position_counts"]), shares, plots / "teacher.png"))
    if summary is not None:
        with writing(summary):
            write_text_atomic(summary, json.dumps(summary_metrics(diffs, teacher), indent=1) + "\n")
    with writing(metrics):  # last, whole or absent: its presence means the evaluation finished
        write_text_atomic(metrics, json.dumps(out, indent=2) + "\n")
    _print(diffs, names, teacher, masked)
    Console().print(f"[bold]{out['summary']}[/bold]")
    log.info("wrote %s and %s", metrics, ", ".join(str(p) for p in pngs))
