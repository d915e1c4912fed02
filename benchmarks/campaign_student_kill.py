"""Kill -9 during `gedistill student-train` (baseline and distilled), rerun, check.

    .venv/bin/python benchmarks/campaign_student_kill.py --kills 12

On a tiny synthetic dataset (tests/conftest.py's walk, 60 users x 12 items) and, for the distilled
runs, a synthetic teacher store: first one uninterrupted reference run per mode (run twice, to
show the run is deterministic), then `--kills` trials. Each trial starts the installed
`gedistill student-train` on an output folder that already holds a complete checkpoint of *another*
run (seed 7: a stale one a rerun overwrites), kills it with SIGKILL at a random moment (or, for
the targeted trials, the moment its report or its temporary weights file appears), then checks:

- after the kill: the folder is either refused by `load_student` (UsageError) or loads as a whole
  checkpoint of one run: the stale one or the reference (weights and config of the same run);
- the rerun (same command, not interrupted) exits 0, and its checkpoint and metrics equal the
  reference run's, byte for byte.

Writes benchmarks/results/campaign_student_kill.{json,md}; exit 1 if any check fails. In a working
tree that others edit, run it on a snapshot so that the code cannot change under it:

    git archive HEAD | tar -x -C /tmp/snap
    PYTHONPATH=/tmp/snap .venv/bin/python /tmp/snap/benchmarks/campaign_student_kill.py --out benchmarks/results/campaign_student_kill
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("GEDISTILL_NO_PROGRESS", "1")

from pipeline.student.checkpoint import COMPLETE, WEIGHTS, load_student  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402

EXE = str(Path(sys.executable).parent / "gedistill")
TRAIN_ARGS = ["--hidden", "16", "--max-len", "8", "--dropout", "0.1", "--batch-size", "16", "--lr", "0.01",
              "--threads", "1"]
DISTILL_ARGS = ["--teacher-batch-size", "8", "--buffer-rows", "64"]


IN_PROCESS = False  # the fast test runs the uninterrupted runs in its own interpreter (no start-up cost)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    if IN_PROCESS:
        from stages.cli import main

        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        return subprocess.CompletedProcess(args, code, "", "")
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, **kw)


def setup(root: Path) -> dict:
    """Prepared data (through the installed command) and a teacher store that matches it."""
    from pipeline.data.prepared import load_prepared
    from tests.conftest import synthetic_interactions
    from tests.distill_helpers import teacher_rows, write_teacher_store

    root.mkdir(parents=True, exist_ok=True)
    inter = root / "inter.csv"
    synthetic_interactions().write_csv(inter)
    r = _run(["prepare", "--out", str(root / "prep"), "--interactions", str(inter)])
    if r.returncode:
        raise SystemExit(f"prepare failed: {r.stderr}")
    prepared = load_prepared(root / "prep")
    cols = teacher_rows(prepared.train, prepared.n_items, k=5, width=8, last_m=3)
    write_teacher_store(root / "store", cols, prepared_fingerprint=prepared.fingerprint, shard_rows=64)
    return {"root": root, "prep": root / "prep", "store": root / "store"}


def command(env: dict, mode: str, out: Path, epochs: int, seed: int = 2020) -> list[str]:
    args = ["student-train", "--prepared", str(env["prep"]), "--out", str(out), "--metrics", str(out.parent / f"{out.name}.json"),
            "--run-name", mode, "--epochs", str(epochs), "--patience", str(epochs), "--seed", str(seed), *TRAIN_ARGS]
    if mode == "distilled":
        args += ["--teacher-cache", str(env["store"]), *DISTILL_ARGS]
    return args


def fingerprint(out: Path) -> dict | None:
    """What identifies a finished run: sha256 of the marker, the checkpoint, its report and the metrics."""
    from pipeline.store import sha256_file

    if not (out / COMPLETE).is_file():
        return None
    files = {n: out / n for n in ("COMPLETE", "config.json", WEIGHTS, "history.json", "ranks.parquet")}
    files["metrics"] = out.parent / f"{out.name}.json"
    return {"marker": (out / COMPLETE).read_text(), **{k: sha256_file(p) if p.is_file() else None for k, p in files.items()}}


def code_hash() -> str:
    """sha256 over the code the installed command runs (editable install): a change mid-campaign shows."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/*.py")]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def reference(env: dict, mode: str, epochs: int, repeats: int = 2) -> dict:
    """Uninterrupted runs: their seconds, and (repeats=2) proof that the run is deterministic."""
    prints, secs = [], []
    for i in range(repeats):
        out = env["root"] / f"ref-{mode}-{i}"
        t0 = time.perf_counter()
        r = _run(command(env, mode, out, epochs))
        secs.append(time.perf_counter() - t0)
        if r.returncode:
            raise SystemExit(f"reference {mode} failed: {r.stderr}")
        prints.append(fingerprint(out))
    stale = env["root"] / f"stale-{mode}"
    if _run(command(env, mode, stale, 2, seed=7)).returncode:
        raise SystemExit(f"stale {mode} run failed")
    differ = sorted({k for p in prints[1:] for k in (p or {}) if (p or {}).get(k) != (prints[0] or {}).get(k)})
    return {"seconds": secs, "deterministic": all(p == prints[0] for p in prints), "differ": differ, "print": prints[0],
            "stale": stale, "stale_print": fingerprint(stale)}


def state_after_kill(out: Path, ref: dict) -> tuple[str, bool]:
    """(what the folder holds, whether that is acceptable)."""
    try:
        _, meta = load_student(out)
    except UsageError as e:
        return ("refused: " + str(e).split(": ", 1)[-1][:60], True)
    marker = (out / COMPLETE).read_text()
    if marker == ref["stale_print"]["marker"]:
        return ("stale checkpoint, whole", meta.get("train", {}).get("seed") == 7)
    if marker == ref["print"]["marker"]:
        return ("new checkpoint, whole", True)
    return ("LOADABLE MIX", False)


def _poll_kill(proc: subprocess.Popen, deadline: float, trigger: Path | None, out: Path) -> str:
    """Wait until `deadline` (or until `trigger` appears), then SIGKILL. Returns what happened."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return "finished before the kill"
        if trigger is not None and trigger.exists():
            break
        time.sleep(0.0005 if trigger is not None else 0.01)
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed" + (f" at {trigger.name}" if trigger is not None and trigger.exists() else "")


def trial(env: dict, i: int, mode: str, ref: dict, epochs: int, when: float | str) -> dict:
    out = env["root"] / f"trial-{i:02d}" / mode
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ref["stale"], out)  # a complete checkpoint of another run is already there
    shutil.copy(ref["stale"].parent / f"{ref['stale'].name}.json", out.parent / f"{out.name}.json")
    env_vars = {**os.environ, "GEDISTILL_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([EXE, *command(env, mode, out, epochs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env_vars)
    mean_s = sum(ref["seconds"]) / len(ref["seconds"])
    if isinstance(when, str):  # targeted: the report being written, or the weights' temporary file
        trigger = out / ("ranks.parquet" if when == "report" else f".{WEIGHTS}.tmp")
        if trigger.exists():
            trigger.unlink()
        what = _poll_kill(proc, t0 + max(3 * mean_s, 300.0), trigger, out)
    else:
        what = _poll_kill(proc, t0 + when * mean_s, None, out)
    killed_at = time.perf_counter() - t0
    state, ok_state = state_after_kill(out, ref)
    r = _run(command(env, mode, out, epochs))
    same = r.returncode == 0 and fingerprint(out) == ref["print"]
    try:
        load_student(out)
        loads = True
    except UsageError:
        loads = False
    return {"trial": i, "mode": mode, "when": when, "event": what, "killed_at_s": round(killed_at, 2),
            "fraction_of_run": round(killed_at / mean_s, 2), "state_after_kill": state, "state_ok": ok_state,
            "rerun_exit": r.returncode, "rerun_loads": loads, "rerun_equals_reference": same,
            "ok": ok_state and r.returncode == 0 and loads and same}


def plan(n: int, seed: int) -> list[tuple[str, float | str]]:
    """Alternate modes; 2 of every 6 trials are targeted (report / temporary weights), the rest random."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        mode = ("baseline", "distilled")[i % 2]
        kind = i % 6
        when: float | str = "report" if kind == 2 else "weights" if kind == 5 else round(rng.uniform(0.15, 1.05), 3)
        out.append((mode, when))
    return out


def campaign(root: Path, trials: list[tuple[str, float | str]], epochs: int, repeats: int = 2) -> dict:
    code_before = code_hash()
    env = setup(root)
    refs = {m: reference(env, m, epochs, repeats) for m in dict.fromkeys(mode for mode, _ in trials)}
    rows = [trial(env, i, mode, refs[mode], epochs, when) for i, (mode, when) in enumerate(trials)]
    return {"epochs": epochs, "kills": len(trials),
            "reference_seconds": {m: [round(s, 2) for s in r["seconds"]] for m, r in refs.items()},
            "deterministic": {m: r["deterministic"] for m, r in refs.items()},
            "reference_files_that_differ": {m: r["differ"] for m, r in refs.items()},
            "code_hash": {"start": code_before, "end": code_hash()},
            "code_dir": str(Path(sys.modules["pipeline"].__file__).parent.parent),
            "trials": rows, "all_ok": all(r["ok"] for r in rows) and all(r["deterministic"] for r in refs.values())}


def table(result: dict) -> str:
    lines = ["| # | mode | kill | event | at (s) | of run | state after kill | rerun exit | rerun = reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["trials"]:
        lines.append(f"| {r['trial']} | {r['mode']} | {r['when']} | {r['event']} | {r['killed_at_s']} | "
                     f"{r['fraction_of_run']} | {r['state_after_kill']} | {r['rerun_exit']} | "
                     f"{'yes' if r['rerun_equals_reference'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "campaign_student_kill")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = campaign(Path(tmp), plan(args.kills, args.seed), args.epochs)
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = f"benchmarks/campaign_student_kill.py --kills {args.kills} --epochs {args.epochs} --seed {args.seed}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"code {result['code_hash']}, reference files that differ {result['reference_files_that_differ']}")
    print(f"reference seconds {result['reference_seconds']}, deterministic {result['deterministic']}, "
          f"all ok: {result['all_ok']}, wall {result['wall_seconds']} s")
    sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
    main()
