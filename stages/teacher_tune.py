"""`gedistill teacher-tune`: make an instruct (or base) LLM a listwise ranker for this catalog, with teacher-dump's
own prompt, identifiers and decision position; write an adapter, a merged HF directory and a held-out report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.errors import UsageError

log = logging.getLogger(__name__)


def teacher_tune(
    prepared: Annotated[Path, typer.Option(help="Folder written by `gedistill prepare`.")] = Path("data/prepared"),
    student: Annotated[Path, typer.Option(help="Baseline checkpoint: the retriever of the K candidates.")] = Path(
        "data/students/baseline"),
    out: Annotated[Path, typer.Option(help="Output folder: adapter/, merged/ (pass to teacher-dump --teacher), "
                                           "checkpoint/, tune.json.")] = Path("data/tuned"),
    teacher: Annotated[str, typer.Option(help="Starting model: `embedded`, an HF id, a local dir or a .gguf.")] = "embedded",
    method: Annotated[Literal["lora", "full"], typer.Option(help="LoRA adapters (peft) or full fine-tuning.")] = "lora",
    k: Annotated[int, typer.Option(min=2, max=26, help="Candidates per prompt (as teacher-dump's store).")] = 20,
    history_len: Annotated[int, typer.Option(min=0, help="History items shown (as teacher-dump).")] = 10,
    identifiers: Annotated[Literal["letters", "digits"], typer.Option(help="Candidate labels (as teacher-dump).")] = "letters",
    template: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Prompt template (as teacher-dump).")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(min=16, help="Prompt budget (as teacher-dump).")] = None,
    dtype: Annotated[Literal["auto", "bfloat16", "float32"], typer.Option(
        help="Compute dtype (bf16 = autocast; weights and optimizer stay fp32). auto: bf16 where it runs fast.")] = "auto",
    lora_r: Annotated[int, typer.Option(min=1)] = 8,
    lora_alpha: Annotated[int, typer.Option(min=1)] = 32,
    lora_dropout: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.05,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names LoRA wraps.")] = "q_proj,v_proj",
    top_layers: Annotated[int, typer.Option(min=0, help="LoRA on the top N layers only (0 = all); the backward "
                                                        "pass stops there, much faster on a CPU.")] = 0,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    grad_accum: Annotated[int, typer.Option(min=1)] = 1,
    warmup_ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.05,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Sample budget (default: every training prefix "
                                                                "x epochs).")] = None,
    budget_minutes: Annotated[float | None, typer.Option(min=0.0, help="Wall-clock budget; the run checkpoints "
                                                                       "and finishes with what it learned.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    holdout_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Users kept out of tuning, for the "
                                                                           "held-out report.")] = 0.1,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Optimizer steps between resumable checkpoints.")] = 50,
    n_boot: Annotated[int, typer.Option(min=100)] = 2000,
    seed: Annotated[int, typer.Option(help="Seeds the user split, candidate shuffle, LoRA's initial weights, data order and dropout.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default.")] = 0,
    metrics: Annotated[Path | None, typer.Option(help="Also write the report (tune.json) here, e.g. for DVC.")] = None,
) -> None:
    """Tune the teacher on training prefixes (verbalizer loss at the decision position); report it on held-out users."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("teacher-tune needs peft: `pip install -e '.[tune]'` (or `make setup`)") from None
    import torch

    from pipeline.teacher.tune import TuneConfig
    from pipeline.teacher.tune_run import TuneRunConfig, run_tune

    if threads > 0:
        torch.set_num_threads(threads)
    if metrics is not None:
        from stages.outputs import ensure_writable

        ensure_writable(metrics.parent)
    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    if not modules and method == "lora":
        raise UsageError("--target-modules is empty; name the projections LoRA wraps, e.g. q_proj,v_proj")
    tcfg = TuneConfig(method=method, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=modules, top_layers=top_layers, lr=lr, batch_size=batch_size,
                      grad_accum=grad_accum, warmup_ratio=warmup_ratio, epochs=epochs, max_samples=max_samples,
                      budget_minutes=budget_minutes, grad_checkpointing=gradient_checkpointing,
                      checkpoint_every=checkpoint_every, seed=seed)
    cfg = TuneRunConfig(teacher=teacher, k=k, history_len=history_len, identifiers=identifiers, template=template,
                        max_prompt_tokens=max_prompt_tokens, dtype=dtype, holdout_fraction=holdout_fraction,
                        n_boot=n_boot, tune=tcfg)
    show = os.environ.get("GEDISTILL_NO_PROGRESS") is None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, disable=not show) as bar:
        task = bar.add_task("teacher-tune", total=None, info="")

        def progress(state, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 1e-9
            recent = state.losses[-20:]
            info = f"loss {sum(recent) / len(recent):.3f}  {state.seen / elapsed:.2f} samples/s"
            bar.update(task, completed=state.seen, total=total, info=info)
            if not show and state.step % 10 == 0:  # logs to a file still show progress
                log.info("step %d: %d/%d samples, %s", state.step, state.seen, total, info)

        result = run_tune(cfg, prepared, student, out, progress=progress)
    if metrics is not None:
        from stages.outputs import write_text_atomic

        write_text_atomic(metrics, json.dumps(result, indent=1) + "\n")
    _print(result, out)


def _print(r: dict, out: Path) -> None:
    console = Console()
    t, s = r["training"], r["samples"]
    last = sum(t["loss_last"]) / max(1, len(t["loss_last"]))
    console.print(f"{out}: {t['steps']} steps over {s['visited']:,} samples ({t['stopped']}); last loss {last:.3f} "
                  f"(chance ln K = {t['loss_ln_k']:.3f}); dtype {r['dtype']}")
    ev = r["evaluation"]
    table = Table(title=f"held-out users: {ev.get('n_sets', 0)} candidate sets with the validation target present")
    table.add_column("scorer")
    names = list(next(iter(ev.get("metrics", {}).values()), {}).keys())
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("top-1 position histogram")
    for scorer, m in ev.get("metrics", {}).items():
        table.add_row(scorer, *(f"{m[n]:.4f}" for n in names), " ".join(map(str, ev["top1_position"][scorer])))
    console.print(table)
    for other, diffs in ev.get("vs_tuned", {}).items():
        d = next(iter(diffs.values()))
        console.print(f"tuned - {other}: {names[0]} {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
    console.print(f"merged teacher: {out / 'merged'} (use `gedistill teacher-dump --teacher {out / 'merged'}`); "
                  f"report {out / 'tune.json'}")
    log.debug(json.dumps(r)[:2000])
