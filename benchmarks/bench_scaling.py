"""Scaling curve: time and peak memory of teacher-dump and of distillation at 1x, 4x, 16x teacher samples.

    .venv/bin/python benchmarks/bench_scaling.py --base 16 --factors 1,4,16 --threads 1 \
        --json benchmarks/results/perf_scaling.json

Everything runs through the installed `gedistill` command, each step in its own process, whose peak
RSS is read from `os.wait4` (that child's own high-water mark, not the parent's):
1. `prepare` (embedded MovieLens-100K) and a baseline `student-train --epochs 1` (only to retrieve from:
   the teacher's cost does not depend on how good its candidates are);
2. `retrieve --samples-per-user 16` (16 training positions per user: 15,088 samples), or
   `--all-positions` with `--all-positions`;
3. per factor f: `teacher-dump --limit base*f --shard-rows base` (so 1x is one shard and 16x is 16),
   then `student-train --teacher-cache <that store> --epochs E` (fixed epochs, no early stop).
Teacher time should grow linearly with the samples (constant samples/s) and its memory stay flat (one
shard in memory at a time); distillation's epoch time is set by the next-item batches (one teacher batch
per step, whatever the store's size) and its memory by the shuffle buffer, so both should stay flat.
The load average is recorded around every step (DESIGN.md point 11).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("gedistill"))


def run(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GEDISTILL_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([EXE, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"gedistill {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=16, help="teacher samples at 1x (also the shard size)")
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16, help="teacher-dump --batch-size")
    ap.add_argument("--epochs", type=int, default=1, help="distillation epochs per store")
    ap.add_argument("--all-positions", action="store_true", help="retrieve --all-positions instead of 16 per user")
    ap.add_argument("--no-distill", action="store_true", help="time teacher-dump only")
    ap.add_argument("--distill-only", action="store_true",
                    help="reuse the stores (and the teacher rows of --json) of an earlier run in --work")
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    th = ["--threads", str(a.threads)]
    res: dict = {"command": "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:]), "threads": a.threads,
                 "cpus": os.cpu_count(), "base": a.base, "teacher": [], "distill": []}
    prep, base, cands = work / "prepared", work / "baseline", work / "candidates.parquet"
    if not (prep / "summary.json").exists():
        res["prepare"] = run(["prepare", "--out", str(prep)], a.threads)
    if not base.exists():
        res["baseline"] = run(["student-train", "--prepared", str(prep), "--out", str(base), "--metrics",
                               str(work / "baseline.json"), "--epochs", "1", *th], a.threads)
    select = ["--all-positions"] if a.all_positions else ["--samples-per-user", "16"]
    if a.distill_only:
        res = {**json.loads(a.json.read_text()), "distill": [], "command_distill": res["command"]}
    else:
        res["retrieve"] = run(["retrieve", "--prepared", str(prep), "--student", str(base), "--out", str(cands),
                           "--k", "20", *select, *th], a.threads)
    for f in (int(x) for x in a.factors.split(",")):
        n = a.base * f
        store = work / f"teacher_{f}x"
        if not a.distill_only:
            shutil.rmtree(store, ignore_errors=True)
            d = run(["teacher-dump", "--prepared", str(prep), "--candidates", str(cands), "--out", str(store),
                     "--limit", str(n), "--shard-rows", str(a.base), "--batch-size", str(a.batch_size), *th], a.threads)
            tokens = sum(pq.read_table(x, columns=["prompt_tokens"]).column(0).to_numpy().sum()
                         for x in sorted(store.glob("*.parquet")))
            d.update(factor=f, samples=n, samples_per_s=n / d["wall_s"], prompt_tokens=int(tokens),
                     prompt_tokens_per_s=tokens / d["wall_s"])
            res["teacher"].append(d)
            print(f"teacher-dump {f:2d}x ({n} samples): {d['wall_s']:.1f} s, {d['samples_per_s']:.3f} samples/s, "
                  f"{d['prompt_tokens_per_s']:.0f} prompt tok/s, "
                  f"cpu {d['cpu_s']:.1f} s, peak RSS {d['peak_rss_mib']:.0f} MiB, "
                  f"load {d['load_before']:.1f}->{d['load_after']:.1f}", flush=True)
        if a.no_distill:
            if a.json:
                a.json.write_text(json.dumps(res, indent=1))
            continue
        s = run(["student-train", "--prepared", str(prep), "--teacher-cache", str(store), "--out", str(work / f"st_{f}x"),
                 "--metrics", str(work / f"st_{f}x.json"), "--run-name", f"scaling_{f}x", "--epochs", str(a.epochs),
                 "--patience", str(a.epochs + 1), *th], a.threads)
        timing = json.loads((work / f"st_{f}x.timing.json").read_text())  # stages/train_student.timing_path
        s.update(factor=f, teacher_rows=n, epochs=a.epochs,
                 train_seconds=[round(r["train_seconds"], 2) for r in timing["epochs"]])
        res["distill"].append(s)
        print(f"distill      {f:2d}x ({n} rows): {s['wall_s']:.1f} s for {a.epochs} epoch(s) "
              f"(train s/epoch {s['train_seconds']}), peak RSS {s['peak_rss_mib']:.0f} MiB, "
              f"load {s['load_before']:.1f}->{s['load_after']:.1f}", flush=True)
        if a.json:  # partial results survive an interruption
            a.json.write_text(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
