"""Seconds per training epoch and peak memory: our SASRec vs RecBole 1.2.1's, in one run.

    .venv/bin/python benchmarks/bench_student.py --threads 1 --epochs 3

Both sides train SASRec on MovieLens-100K (the copy inside the recbole wheel) with the same
hyperparameters (hidden 64, 2 blocks, 2 heads, inner 256, dropout 0.5/0.5, max length 50, full
softmax CE; Adam with each side's default batch and learning rate) and the same torch thread count. Each side runs in its own child
process with its own interpreter (ours: the project venv; RecBole: .venv-recbole, made by
benchmarks/setup_recbole.sh), so peak RSS (VmHWM) is per side. A side's
epoch time is the median over `--epochs` training epochs, validation excluded.

What "one epoch" means on each side (both are one pass over every training target once):
- RecBole: 97,171 prefix samples (one per training interaction after a user's first), each a
  left-padded window of at most 50 items, loss on its last position; batch 2048.
- ours (`pipeline.student.train.fit`, the project's defaults): every training target once, packed into
  windows of 50 with a loss at every position (TrainConfig.batch_size windows per step).

The parent writes benchmarks/results/bench_student.json and prints a summary; the ratio
ours/RecBole (seconds per epoch) has the goal <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK = "BENCH_JSON "


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM). getrusage's ru_maxrss would also do here,
    but after fork+exec it can carry the parent's mark; VmHWM belongs to this image only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def _emit(d: dict) -> None:
    print(MARK + json.dumps(d), flush=True)


# ---------------------------------------------------------------- child: RecBole (its venv)
def side_recbole(threads: int, epochs: int, seed: int) -> dict:
    sys.path.insert(0, str(HERE))
    from recbole_reference import build  # noqa: E402

    work = tempfile.mkdtemp(prefix="bench_recbole_")
    t0 = time.perf_counter()
    cfg, dataset, train_data, valid_data, test_data, model, trainer = build(
        threads, epochs=epochs, seed=seed, workdir=work, log=False)
    setup_s = time.perf_counter() - t0
    import torch

    rss_setup = _rss_now_mib()
    times, losses = [], []
    for e in range(epochs):
        s = time.perf_counter()
        loss = trainer._train_epoch(train_data, e, show_progress=False)
        times.append(time.perf_counter() - s)
        losses.append(float(loss if not isinstance(loss, tuple) else sum(loss)))
        print(f"recbole epoch {e}: {times[-1]:.1f}s load {os.getloadavg()[0]:.2f}",
              file=sys.stderr, flush=True)
    return {
        "side": "recbole",
        "impl": "recbole.model.sequential_recommender.SASRec + recbole.trainer.Trainer._train_epoch",
        "train_samples": len(train_data._dataset),
        "batch_size": cfg["train_batch_size"],
        "steps_per_epoch": len(train_data),
        "epoch_s": times,
        "train_loss": losses,
        "setup_s": setup_s,
        "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_measure": "VmHWM",
        "threads": torch.get_num_threads(),
        "anomaly_detection": torch.is_anomaly_enabled(),
        "versions": {"torch": torch.__version__, "recbole": __import__("recbole").__version__},
    }


# ---------------------------------------------------------------- child: ours (project venv)
def side_ours(threads: int, epochs: int, seed: int) -> dict:
    import contextlib

    sys.path.insert(0, str(REPO))
    import torch
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig
    from pipeline.data.sequences import training_windows
    from pipeline.student.train import TrainConfig, fit
    from stages.prepare import prepare

    _set_threads(threads)
    t0 = time.perf_counter()
    prep_dir = Path(tempfile.mkdtemp(prefix="bench_ours_")) / "prepared"
    with contextlib.redirect_stdout(sys.stderr):
        prepare(out=prep_dir)  # the embedded MovieLens-100K, project defaults
    data = load_prepared(prep_dir)
    mcfg = SasrecConfig(n_items=data.n_items)  # defaults: 64, 2 blocks, 2 heads, 256, 50, 0.5/0.5
    tcfg = TrainConfig(epochs=epochs, patience=epochs + 1, seed=seed)  # defaults: CE, lr 1e-3
    torch.manual_seed(seed)
    model = SASRec(mcfg)
    X, Y = training_windows(data.train, mcfg.max_len, tcfg.stride)
    setup_s = time.perf_counter() - t0
    rss_setup = _rss_now_mib()
    _set_threads(threads)
    result = fit(model, data, tcfg, show_progress=False)
    times = [float(r["train_seconds"]) for r in result.history]
    for e, t in enumerate(times):
        print(f"ours epoch {e}: {t:.1f}s", file=sys.stderr, flush=True)
    return {
        "side": "ours",
        "impl": "pipeline.student.train.fit (history[].train_seconds; validation excluded)",
        "train_targets": int((Y != 0).sum()),
        "windows": int(len(X)),
        "batch_size_windows": tcfg.batch_size,
        "steps_per_epoch": (len(X) + tcfg.batch_size - 1) // tcfg.batch_size,
        "epoch_s": times,
        "train_loss": [float(r.get("loss", float("nan"))) for r in result.history],
        "valid_ndcg@10": [float(r.get("valid_ndcg@10", float("nan"))) for r in result.history],
        "setup_s": setup_s,
        "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_measure": "VmHWM",
        "threads": torch.get_num_threads(),
        "anomaly_detection": torch.is_anomaly_enabled(),
        "config": {"sasrec": mcfg.__dict__, "train": tcfg.__dict__},
        "versions": {"torch": torch.__version__},
    }


# ---------------------------------------------------------------- parent
def run_side(python: str, side: str, threads: int, epochs: int, seed: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               GEDISTILL_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--threads", str(threads),
           "--epochs", str(epochs), "--seed", str(seed)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{side} side failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}")
    d = json.loads(lines[-1][len(MARK):])
    d["python"] = python
    d["wall_s"] = wall
    d["loadavg_before"] = list(load0)
    d["loadavg_after"] = list(os.getloadavg())
    d["epoch_median_s"] = statistics.median(d["epoch_s"])
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per side (median taken)")
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--recbole-python", default=str(REPO / ".venv-recbole" / "bin" / "python"))
    ap.add_argument("--sides", default="recbole,ours", help="comma list, run in this order")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per side")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_student.json")
    ap.add_argument("--side", choices=["ours", "recbole"], help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()

    if args.side:
        fn = side_ours if args.side == "ours" else side_recbole
        _emit(fn(args.threads, args.epochs, args.seed))
        return

    for side, py in (("ours", args.ours_python), ("recbole", args.recbole_python)):
        if side in args.sides and not Path(py).exists():
            sys.exit(f"{py} not found" + (" (run: bash benchmarks/setup_recbole.sh)"
                                          if side == "recbole" else ""))
    res: dict = {}
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        py = args.ours_python if side == "ours" else args.recbole_python
        print(f"[bench] {side}: {args.epochs} epochs, {args.threads} thread(s), "
              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        res[side] = run_side(py, side, args.threads, args.epochs, args.seed, args.timeout)

    summary = {
        "command": f".venv/bin/python benchmarks/bench_student.py --threads {args.threads} "
                   f"--epochs {args.epochs} --sides {args.sides}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "threads": args.threads,
        "epochs_measured": args.epochs,
        "sides": res,
    }
    if "ours" in res and "recbole" in res:
        summary["ratio_epoch_time_ours_over_recbole"] = (
            res["ours"]["epoch_median_s"] / res["recbole"]["epoch_median_s"])
        summary["ratio_peak_rss_ours_over_recbole"] = (
            res["ours"]["peak_rss_mib"] / res["recbole"]["peak_rss_mib"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"{'side':8} {'median s/epoch':>15} {'epochs (s)':>28} {'peak RSS MiB':>13} {'load before/after':>18}")
    for side, d in res.items():
        ep = ", ".join(f"{t:.1f}" for t in d["epoch_s"])
        print(f"{side:8} {d['epoch_median_s']:15.2f} {ep:>28} {d['peak_rss_mib']:13.0f} "
              f"{d['loadavg_before'][0]:8.2f}/{d['loadavg_after'][0]:.2f}")
    if "ratio_epoch_time_ours_over_recbole" in summary:
        print(f"ratio ours/RecBole: epoch time {summary['ratio_epoch_time_ours_over_recbole']:.3f} "
              f"(goal <= 1.0), peak RSS {summary['ratio_peak_rss_ours_over_recbole']:.3f}")
    print(f"threads {args.threads}; wrote {args.out}")


if __name__ == "__main__":
    main()
