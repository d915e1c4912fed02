"""A/B: teacher-dump's OpenMP wait policy (libgomp's spin before a thread sleeps), on an idle and a loaded machine.

Issue 10 lists "thread settings and spin-wait policy (idle vs loaded machine)" among the candidates. torch's CPU
wheel runs its intra-op threads on libgomp: between parallel regions a worker spins (GOMP_SPINCOUNT, 300,000 turns
by default) before it sleeps. On an idle machine that saves wake-ups; with another job on a core, a spinning worker
takes time the job or the other worker needs (DESIGN.md 11: a forward 0.8 s -> 9.3 s on 2 threads beside a busy
process). OMP_WAIT_POLICY must be set before libgomp starts, so every side is a fresh `gedistill teacher-dump`
(the installed CLI) on the same first --limit samples:

- `t2`: --threads 2, no libgomp setting in the environment: what gedistill sets itself (pipeline/omp.py, since
  2026-12-03: GOMP_SPINCOUNT=30000; before that, libgomp's default);
- `t2_spin300k`: --threads 2 with GOMP_SPINCOUNT=300000 (libgomp's default, spelled out);
- `t2_passive`: --threads 2 with OMP_WAIT_POLICY=PASSIVE (a waiting worker sleeps at once);
- `t2_spin10k`, `t2_spin30k`: --threads 2 with GOMP_SPINCOUNT=10000 / 30000 (a shorter spin, then sleep);
- `t1`: --threads 1 (what DESIGN.md 11 advises when other jobs run; no worker to wait).

With --load N, N busy loops (`while True: pass`, one core each) run through the whole condition: the "other job".
Reported per run: the dump's own seconds (its log's "N samples in S s": model loading excluded), wall and CPU
seconds of the process. `--stage baseline|distill` times `gedistill student-train` instead (--epochs epochs, the
whole process timed, validation and the final evaluation included; model and ranks compared byte for byte).
Outputs of one thread count must be byte-identical (h_dec, scores, ranking: the wait policy does not change the
arithmetic; the script exits non-zero otherwise); `t1_same_as_t2` says whether 1 and 2 threads gave the same bytes.

    .venv/bin/python benchmarks/ab_wait_policy.py --prepared data/prepared \\
        --candidates data/candidates/candidates.parquet --limit 48 --rounds 3 --load 0 \\
        --json benchmarks/results/ab_wait_policy_idle.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

EXE = str(Path(sys.executable).with_name("gedistill"))
SIDES = {  # name: (--threads, libgomp's settings in the environment)
    "t2": (2, {}),  # gedistill's own setting (pipeline/omp.py; before it, libgomp's default)
    "t2_spin300k": (2, {"GOMP_SPINCOUNT": "300000"}),  # libgomp's default, spelled out
    "t2_passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t2_spin10k": (2, {"GOMP_SPINCOUNT": "10000"}),
    "t2_spin30k": (2, {"GOMP_SPINCOUNT": "30000"}),
    "t1": (1, {}),
}
GOMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DONE = re.compile(r"(\d+)\s+samples\s+in\s+([0-9.]+)\s*s")


def run_side(prepared: Path, candidates: Path, out: Path, limit: int, side: str, stage: str = "dump",
         store: Path | None = None, epochs: int = 3) -> dict:
    threads, settings = SIDES[side]
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    for k in GOMP_ENV:
        env.pop(k, None)
    env.update(settings)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if stage == "dump":
        args = ["teacher-dump", "--prepared", str(prepared), "--candidates", str(candidates), "--out", str(out),
                "--limit", str(limit)]
    else:  # the student: a few epochs of the default baseline, or distilled from --store
        args = ["student-train", "--prepared", str(prepared), "--out", str(out / "student"), "--metrics",
                str(out / "metrics.json"), "--epochs", str(epochs), "--patience", str(epochs + 1)]
        args += ["--teacher-cache", str(store)] if stage == "distill" else []
    proc = subprocess.Popen([EXE, *args, "--threads", str(threads)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    err = proc.stdout.read()  # the log and the closing summary together
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args[0]} ({side}) failed:\n{err[-3000:]}")
    if stage != "dump":
        epoch_s = [r["train_seconds"] for r in json.loads((out / "metrics.timing.json").read_text())["epochs"]]
        # timed: the whole process (validation, on all threads, and the final evaluation included)
        return {"side": side, "epoch_seconds": epoch_s, "dump_s": wall, "samples_per_s": len(epoch_s) / wall,
                "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load0}
    m = DONE.findall(err)
    if not m:
        raise SystemExit(f"teacher-dump ({side}): no 'N samples in S s' line in its log:\n{err[-2000:]}")
    n, secs = int(m[-1][0]), float(m[-1][1])
    return {"side": side, "samples": n, "dump_s": secs, "samples_per_s": n / secs, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load0}


def arrays(store: Path) -> dict[str, bytes]:
    if (store / "student").is_dir():  # a student: its weights and ranks
        return {f.name: f.read_bytes() for f in (store / "student" / "model.safetensors", store / "student" / "ranks.parquet")}
    out: dict[str, bytes] = {}
    for f in sorted(store.glob("*.parquet")):
        t = pq.read_table(f)
        for col in ("sample_id", "h_dec", "scores", "ranking"):
            if col in t.column_names:
                out[col] = out.get(col, b"") + repr(t.column(col).to_pylist()).encode()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--candidates", type=Path, default=Path("data/candidates/candidates.parquet"))
    ap.add_argument("--limit", type=int, default=48, help="teacher samples per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default="t2,t2_passive,t1")
    ap.add_argument("--load", type=int, default=0, help="busy loops running beside the dumps")
    ap.add_argument("--stage", choices=("dump", "baseline", "distill"), default="dump",
                    help="time teacher-dump, or --epochs epochs of student-train (the baseline, or distilled from --store)")
    ap.add_argument("--store", type=Path, help="a teacher store of --prepared, for --stage distill")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    sides = a.sides.split(",")
    if a.stage == "distill" and not a.store:
        ap.error("--stage distill needs --store")
    if unknown := [s for s in sides if s not in SIDES]:
        ap.error(f"unknown side(s) {unknown}; choose from {sorted(SIDES)}")
    unit = "samples/s" if a.stage == "dump" else "epochs/s"
    loaders = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    runs: list[dict] = []
    reference: dict[int, dict[str, bytes]] = {}  # per thread count: the first store's columns
    same = True
    try:
        with tempfile.TemporaryDirectory(prefix="ab_wait-") as tmp:
            for r in range(a.rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    store = Path(tmp) / f"{side}_{r}"
                    run = {**run_side(a.prepared, a.candidates, store, a.limit, side, a.stage, a.store, a.epochs),
                           "round": r}
                    got = arrays(store)
                    run["same_bytes"] = got == reference.setdefault(SIDES[side][0], got)
                    same &= run["same_bytes"]
                    runs.append(run)
                    shutil.rmtree(store)
                    print(f"round {r} {side:10s} {run['samples_per_s']:.3f} {unit} (timed {run['dump_s']:.1f} s, "
                          f"wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s) load {run['load_before']:.2f}"
                          f"{'' if run['same_bytes'] else ' OTHER BYTES'}", flush=True)
    finally:
        for p in loaders:
            p.kill()
            p.wait()
    t1_same = reference[1] == reference[2] if len(reference) == 2 else None
    summary = {}
    for side in sides:
        mine = [x for x in runs if x["side"] == side]
        summary[side] = {"median_samples_per_s": statistics.median(x["samples_per_s"] for x in mine),
                         "median_dump_s": statistics.median(x["dump_s"] for x in mine),
                         "median_cpu_s": statistics.median(x["cpu_s"] for x in mine)}
    base = summary[sides[0]]
    for side in sides:
        s = summary[side]
        s["dump_time_ratio"] = s["median_dump_s"] / base["median_dump_s"]
        s["rounds_faster"] = sum(x["dump_s"] < y["dump_s"] for x in runs if x["side"] == side
                                 for y in runs if y["side"] == sides[0] and y["round"] == x["round"])
        print(f"{side:10s} median {s['median_samples_per_s']:.3f} {unit}, time {s['dump_time_ratio']:.3f}x "
              f"{sides[0]}, faster in {s['rounds_faster']}/{a.rounds} rounds, cpu {s['median_cpu_s']:.1f} s")
    if a.json:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "cpu": cpu, "nproc": os.cpu_count(),
                                      "stage": a.stage, "load": a.load, "limit": a.limit, "runs": runs, "summary": summary,
                                      "same_bytes": same, "t1_same_as_t2": t1_same}, indent=1))
    if not same:
        sys.exit("the sides' stores differ: see the JSON")


if __name__ == "__main__":
    main()
