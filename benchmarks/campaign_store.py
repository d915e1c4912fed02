"""Store campaigns through the installed `gedistill`, results as JSON (docs/RELIABILITY.md has the tables).

    .venv/bin/python benchmarks/campaign_store.py corruption   # 27 kinds x cache verify / cache merge / student-train / evaluate
    .venv/bin/python benchmarks/campaign_store.py kill         # SIGKILL teacher-dump (real embedded teacher), then rerun
    .venv/bin/python benchmarks/campaign_store.py verify-cost  # what verifying a store costs against sha256 alone

corruption: small stores made with the fake teacher (tests/test_store_corruption.py holds the kinds);
each damaged copy goes through the four commands as a subprocess; a kind is caught by a command when it
exits 2 and its output names the damaged file. The good store through the same four commands is the
control (exit 0).

kill: the real embedded teacher on 24 samples (--shard-rows 4 --batch-size 4 --threads 1, 6 shards).
One uninterrupted run is the reference; then, for each test-only fault point (GEDISTILL_FAULT=point:2,
the 2nd shard or manifest write) and for --random kills at uniform times within a reference run's
duration, the run is killed with SIGKILL and rerun; the store must then hold the reference's rows
exactly (every column, h_dec included), be `complete`, hold no temporary file and pass `cache verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_entrypoint import gedistill_exe, run_gedistill  # noqa: E402


def _named(proc: subprocess.CompletedProcess, name: str) -> bool:
    return name in " ".join((proc.stdout + proc.stderr).split())


def _first_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:")]
    return (errs or lines or [""])[0][:300]


def _students(world, root: Path) -> tuple[Path, Path]:
    """Two untrained students of the prepared data: evaluate needs checkpoints, not good ones."""
    import torch

    from pipeline.student.checkpoint import save_student
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig

    data = load_prepared(world.prepared)
    out = []
    for name in ("baseline", "distilled"):
        torch.manual_seed(0)
        model = SASRec(SasrecConfig(n_items=data.n_items, hidden=8, n_blocks=1, n_heads=1, inner=16, max_len=8))
        save_student(root / name, model, {"prepared_fingerprint": data.fingerprint})
        out.append(root / name)
    return out[0], out[1]


def corruption(args: argparse.Namespace) -> dict:
    from tests.test_store_corruption import KINDS, damaged_copy, make_world

    root = Path(tempfile.mkdtemp(prefix="campaign-corruption-"))
    world = make_world(root / "world")
    baseline, distilled = _students(world, root)
    p = str(world.prepared)

    def commands(store: Path, tag: str) -> dict[str, list[str]]:
        work = root / "out" / tag
        return {
            "cache verify": ["cache", "verify", str(store), "--prepared", p],
            "cache merge": ["cache", "merge", str(work / "merged"), str(store), "--prepared", p],
            "student-train": ["student-train", "--prepared", p, "--teacher-cache", str(store), "--out",
                              str(work / "student"), "--metrics", str(work / "student.json"), "--epochs", "1",
                              "--hidden", "8", "--heads", "1", "--blocks", "1", "--max-len", "8", "--batch-size", "8",
                              "--threads", "1", "--teacher-batch-size", "4", "--buffer-rows", "16"],
            "evaluate": ["evaluate", "--prepared", p, "--baseline", str(baseline), "--distilled", str(distilled),
                         "--teacher-cache", str(store), "--metrics", str(work / "evaluate.json"),
                         "--plots", str(work / "plots"), "--n-boot", "100", "--threads", "1"],
        }

    control = {}
    for cmd, argv in commands(world.good, "control").items():
        t0 = time.perf_counter()
        proc = run_gedistill(*argv, cwd=root)
        control[cmd] = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                        "error": _first_error(proc) if proc.returncode else ""}
        print(f"control / {cmd}: exit {proc.returncode}", flush=True)
    def one(i: int, kind: str, name: str | None, store: Path, cmd: str, argv: list[str]) -> dict:
        t0 = time.perf_counter()
        proc = run_gedistill(*argv, cwd=root)
        trained = (root / "out" / f"k{i:02d}" / "student").exists()
        named = name or str(store)
        caught = proc.returncode == 2 and _named(proc, named) and "Traceback" not in proc.stderr and not trained
        print(f"{kind} / {cmd}: exit {proc.returncode}, names file {_named(proc, named)}, caught {caught}", flush=True)
        return {"kind": kind, "command": cmd, "exit": proc.returncode, "names_file": _named(proc, named),
                "file": name or "(the store)", "traceback": "Traceback" in proc.stderr, "student_written": trained,
                "caught": caught, "seconds": round(time.perf_counter() - t0, 1), "message": _first_error(proc),
                "stderr_tail": "" if caught else proc.stderr[-1500:]}

    jobs = []
    for i, (kind, (_, name)) in enumerate(KINDS.items()):
        if args.kinds and not any(sub in kind for sub in args.kinds):
            continue
        store = damaged_copy(world, kind, root / "damaged" / f"k{i:02d}")
        jobs += [(i, kind, name, store, cmd, argv) for cmd, argv in commands(store, f"k{i:02d}").items()]
    with ThreadPoolExecutor(args.jobs) as pool:  # subprocesses: the threads only wait
        rows = list(pool.map(lambda job: one(*job), jobs))
    n_kinds = len({r["kind"] for r in rows})
    by_cmd = {c: f"{sum(r['caught'] for r in rows if r['command'] == c)}/{n_kinds}" for c in control}
    shutil.rmtree(root, ignore_errors=True)
    return {"kinds": n_kinds, "caught_by_command": by_cmd, "control": control, "rows": rows}


def _store_rows(store: Path):
    import polars as pl

    return pl.concat([pl.read_parquet(p) for p in sorted(store.glob("part-*.parquet"))]).sort("sample_id")


def kill(args: argparse.Namespace) -> dict:
    from pipeline.store.faults import ENV, POINTS
    from tests.teacher_fixtures import make_inputs

    root = Path(tempfile.mkdtemp(prefix="campaign-kill-"))
    prepared, cands = make_inputs(root / "in", n_users=12, per_user=2)  # 24 samples
    base = ["teacher-dump", "--prepared", str(prepared), "--candidates", str(cands), "--limit", "24",
            "--shard-rows", "4", "--batch-size", "4", "--threads", "1"]
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1"}
    env.pop(ENV, None)

    def start(out: Path, fault: str | None = None) -> subprocess.Popen:
        e = {**env, ENV: fault} if fault else env
        return subprocess.Popen([gedistill_exe(), *base, "--out", str(out)], env=e, cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    t0 = time.perf_counter()
    ref = root / "ref"
    proc = start(ref)
    out, err = proc.communicate()
    ref_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed: {err[-2000:]}")
    reference = _store_rows(ref)
    print(f"reference: {reference.height} rows in {ref_seconds:.1f} s", flush=True)
    rng = random.Random(args.seed)
    points = POINTS if args.points is None else [p for p in args.points if p != "none"]
    moments = [("fault", f"{p}:2") for p in points] + [
        ("random", round(rng.uniform(2.0, ref_seconds), 1)) for _ in range(args.random)]
    results = []
    for j, (how, what) in enumerate(moments):
        store = root / f"run{j:02d}"
        t1 = time.perf_counter()
        if how == "fault":
            p = start(store, what)
            p.communicate()
        else:
            p = start(store)
            try:
                p.communicate(timeout=what)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.communicate()
        killed = p.returncode == -signal.SIGKILL
        left = sorted(x.name for x in store.iterdir()) if store.exists() else []
        t2 = time.perf_counter()
        rerun = start(store)
        _, rerr = rerun.communicate()
        rerun_s = time.perf_counter() - t2
        verify = run_gedistill("cache", "verify", str(store), "--prepared", str(prepared), cwd=root)
        same = rerun.returncode == 0 and _store_rows(store).equals(reference)
        manifest = json.loads((store / "manifest.json").read_text()) if rerun.returncode == 0 else {}
        temps = [x.name for x in store.iterdir() if ".tmp-" in x.name]
        ok = same and verify.returncode == 0 and manifest.get("complete") is True and not temps
        results.append({"moment": how, "at": what, "killed": killed, "kill_run_seconds": round(t2 - t1, 1),
                        "left_after_kill": left, "rerun_exit": rerun.returncode, "rerun_seconds": round(rerun_s, 1),
                        "rows_identical": same, "verify_exit": verify.returncode, "temp_files_left": temps,
                        "ok": ok, "rerun_error": "" if rerun.returncode == 0 else rerr[-500:]})
        print(f"{how} {what}: killed {killed}, rerun exit {rerun.returncode}, rows identical {same}, verify "
              f"{verify.returncode}, ok {ok}", flush=True)
        if args.out:  # partial results survive an interrupted campaign
            args.out.write_text(json.dumps({"partial": True, "results": results}, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return {"reference_seconds": round(ref_seconds, 1), "reference_rows": reference.height, "moments": len(results),
            "ok": f"{sum(r['ok'] for r in results)}/{len(results)}", "results": results}


def verify_cost(args: argparse.Namespace) -> dict:
    """Seconds to verify a synthetic store (20,000 rows, h_dec 576 x float16) against sha256 alone."""
    import numpy as np
    import pyarrow as pa

    from pipeline.store import StoreSpec, StoreWriter, sha256_file
    from pipeline.store.check import verify_store

    n, k, width, shard_rows = 20_000, 20, 576, 2048
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="campaign-verify-")) / "store"
    spec = StoreSpec({"k": k, "prepared_fingerprint": "synthetic", "teacher": {"name": "synthetic", "hidden_size": width}},
                     n, shard_rows, width, "float16")
    writer = StoreWriter(root, spec)
    for i in range(spec.n_shards):
        a, b = spec.shard_range(i)
        m = b - a
        writer.write_shard(i, pa.table({
            "sample_id": pa.array(np.arange(a, b), pa.int64()), "user_idx": pa.array(np.zeros(m, np.int32)),
            "position": pa.array(np.ones(m, np.int32)), "target": pa.array(np.ones(m, np.int32)),
            "candidates": pa.array([list(range(1, k + 1))] * m, pa.list_(pa.int32())),
            "ranking": pa.array([rng.permutation(k).tolist() for _ in range(m)], pa.list_(pa.int16())),
            "scores": pa.array(rng.standard_normal((m, k)).astype(np.float32).tolist(), pa.list_(pa.float32())),
            "h_dec": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(m * width).astype(np.float16)), width),
            "status": pa.array(["ok"] * m), "prompt_tokens": pa.array(np.full(m, 400, np.int32)),
            "truncated": pa.array([False] * m), "prompt": pa.array(["x" * 1500] * m),
            "generated": pa.array([None] * m, pa.string())}))
    writer.write_manifest()
    shards = sorted(root.glob("part-*.parquet"))
    t0 = time.perf_counter()
    for path in shards:
        sha256_file(path)
    t1 = time.perf_counter()
    problems = verify_store(root)
    t2 = time.perf_counter()
    mb = round(sum(p.stat().st_size for p in shards) / 1e6, 1)
    shutil.rmtree(root.parent, ignore_errors=True)
    return {"rows": n, "shards": len(shards), "mb": mb,
            "sha256_only_s": round(t1 - t0, 2), "verify_store_s": round(t2 - t1, 2), "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("campaign", choices=["corruption", "kill", "verify-cost"])
    ap.add_argument("--out", type=Path, help="JSON result file (default benchmarks/results/campaign_store_<campaign>.json)")
    ap.add_argument("--random", type=int, default=3, help="kill: random-time kills besides the fault points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="corruption: commands run at once")
    ap.add_argument("--points", nargs="*", help="kill: only these fault points (default: all; `none`: random kills only)")
    ap.add_argument("--kinds", nargs="*", help="corruption: only the kinds whose name contains one of these")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"corruption": corruption, "kill": kill, "verify-cost": verify_cost}[args.campaign](args)
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0], "python": platform.python_version()}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = args.out or ROOT / "benchmarks" / "results" / f"campaign_store_{args.campaign}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "results")}, indent=1))


if __name__ == "__main__":
    main()
