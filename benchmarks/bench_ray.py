"""teacher-dump on Ray against the single-process run, side by side: samples/s and Ray's overhead.

    python benchmarks/bench_ray.py [--samples 24 --shard-rows 4 --reps 2 --out benchmarks/results/ray_bench.json]

The embedded teacher, the embedded MovieLens-100K (`gedistill prepare`), 20 random unseen candidates per
user (the prompt shape of the default pipeline: K=20, 10 history titles), first-token mode, float32,
1 torch thread per process. Per round, in this order: the single-process run (run_dump, the teacher
loaded in this process beforehand), then run_ray_dump with 1 and with 2 actors on one local Ray
cluster (num_cpus=2) that this script starts once. Each run writes a fresh store; every Ray store must
be byte-identical to the single-process one (checked, recorded).

Rates: `samples/s` counts the dump loop only (single: after the model is loaded; Ray: after every
actor has loaded the teacher, until the last shard is written); `end-to-end` adds the model load
(single) or the actors' start and teacher load (Ray; the cluster's own start is reported apart, once).
Ray's per-shard overhead: `dispatch_s` (from the actor being free and the task submitted to its start)
and `return_s` (from the actor's return to the driver holding the table: serialisation, transfer),
medians over shards; plus a direct ray.put/ray.get round trip of one shard's table.
The machine's load average is recorded before and after every run: timings on a shared, loaded
machine are noisy; compare the ratios within one round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_teacher import synth_candidates  # noqa: E402  (the prompts every teacher benchmark uses)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def store_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name == "manifest.json" or p.suffix == ".parquet"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--shard-rows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prepared", type=Path, default=None, help="prepared ML-100K (default: `gedistill prepare` here)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_bench.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch

    from pipeline.teacher.dump import DumpConfig, TeacherOptions, load_backend, load_inputs, run_dump
    from pipeline.teacher.ray_dump import RayOptions, run_ray_dump

    work = Path(tempfile.mkdtemp(prefix="bench_ray-"))
    gedistill = Path(sys.executable).with_name("gedistill")
    prepared = args.prepared or work / "prepared"
    if args.prepared is None:
        subprocess.run([str(gedistill), "prepare", "--out", str(prepared)], check=True, capture_output=True)
    cands = synth_candidates(prepared, work / "candidates.parquet")
    inputs = load_inputs(prepared, cands, limit=args.samples)
    cfg = DumpConfig(shard_rows=args.shard_rows)  # first-token, history 10, K=20 shuffled: the defaults
    opts = TeacherOptions(backend="hf", dtype="float32", threads=1)

    result: dict = {"command": "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:]),
                    "settings": {"samples": inputs.samples.height, "shard_rows": args.shard_rows,
                                 "n_shards": -(-inputs.samples.height // args.shard_rows), "k": inputs.k,
                                 "history_len": cfg.history_len, "mode": cfg.mode, "dtype": "float32",
                                 "threads_per_process": 1, "hf_batch_size": 8, "ray": ray.__version__},
                    "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()}, "runs": []}

    t = time.perf_counter()
    torch.set_num_threads(1)
    backend, facts, _ = load_backend(opts, inputs.k)
    single_load_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        ray.init(num_cpus=2, include_dashboard=False, namespace="gedistill-bench", logging_level="WARNING")
    except Exception as e:  # noqa: BLE001 - ray raises a bare Exception when its raylet misses its 30 s window
        # no retry in-process: the failed start's GCS server lives on until this process exits
        raise SystemExit(f"could not start a local Ray cluster ({e}) at load {loadavg()}; run again later") from e
    result["ray_cluster_start_s"] = round(time.perf_counter() - t, 2)

    def save() -> None:  # after every run: a run cut short by a timeout keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    ref: dict[str, bytes] | None = None
    for rep in range(args.reps):
        out = work / f"single-{rep}"
        before = loadavg()
        report = run_dump(cfg, inputs, backend, facts, out)
        got = store_bytes(out)
        ref = ref or got
        result["runs"].append({"round": rep, "runner": "single", "actors": 0, "loadavg_before": before,
                               "loadavg_after": loadavg(), "loop_s": round(report.seconds, 2),
                               "samples_per_s": round(report.samples / report.seconds, 3),
                               "end_to_end_s": round(report.seconds + single_load_s, 2),
                               "startup_s": round(single_load_s, 2), "identical_to_single": got == ref})
        print(json.dumps(result["runs"][-1]), flush=True)
        save()
        for n in args.actors:
            out = work / f"ray{n}-{rep}"
            before = loadavg()
            r = run_ray_dump(cfg, inputs, opts, out, RayOptions(actors=n, threads=1))
            shards = r.shards
            result["runs"].append({
                "round": rep, "runner": "ray", "actors": n, "loadavg_before": before, "loadavg_after": loadavg(),
                "loop_s": round(r.dump.seconds, 2), "samples_per_s": round(r.dump.samples / r.dump.seconds, 3),
                "end_to_end_s": round(r.dump.seconds + r.actors_ready_s, 2), "startup_s": round(r.actors_ready_s, 2),
                "shard_compute_s_median": round(statistics.median(s["compute_s"] for s in shards), 3),
                "shard_dispatch_ms_median": round(1000 * statistics.median(s["dispatch_s"] for s in shards), 1),
                "shard_return_ms_median": round(1000 * statistics.median(s["return_s"] for s in shards), 1),
                "shard_write_ms_median": round(1000 * statistics.median(s["write_s"] for s in shards), 1),
                "shard_bytes_median": int(statistics.median(s["bytes"] for s in shards)),
                "restarts": r.restarts, "identical_to_single": store_bytes(out) == ref})
            print(json.dumps(result["runs"][-1]), flush=True)
            save()

    # serialisation alone: one shard's table through the object store and back, in this process
    import pyarrow.parquet as pq

    table = pq.read_table(next((work / "single-0").glob("part-*.parquet")))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        ray.get(ray.put(table))
        times.append(time.perf_counter() - t)
    result["put_get_one_shard_ms_median"] = round(1000 * statistics.median(times), 2)
    result["shard_table_bytes"] = table.nbytes
    ray.shutdown()

    def med(runner: str, actors: int, key: str) -> float:
        return statistics.median(x[key] for x in result["runs"] if x["runner"] == runner and x["actors"] == actors)

    base = med("single", 0, "samples_per_s")
    result["summary"] = [{"runner": "single" if n == 0 else f"ray, {n} actor(s)",
                          "samples_per_s_median": med("single" if n == 0 else "ray", n, "samples_per_s"),
                          "ratio_to_single": round(med("single" if n == 0 else "ray", n, "samples_per_s") / base, 3),
                          "end_to_end_s_median": med("single" if n == 0 else "ray", n, "end_to_end_s"),
                          "startup_s_median": med("single" if n == 0 else "ray", n, "startup_s")}
                         for n in [0, *args.actors]]
    result["machine"]["loadavg_end"] = loadavg()
    result["all_identical_to_single"] = all(x["identical_to_single"] for x in result["runs"])
    save()
    print(json.dumps(result["summary"], indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
