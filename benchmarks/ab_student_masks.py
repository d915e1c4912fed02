"""A/B: the baseline's dropout masks drawn in place (one thread) against drawn ahead by a helper thread.

With --store, `distill` trains the default distilled student instead (the teacher branch in a second thread, as
`student-train --teacher-cache STORE --threads 2` does): `--sides distill,ahead` gives a distilled epoch's cost over
a baseline epoch, side by side.

Each side trains the default baseline (`pipeline.student.train.fit` with TrainConfig's defaults) for --epochs epochs
in a fresh process; the sides alternate round by round (the order flips every round). Reported per side: each
epoch's training seconds, the whole fit's seconds (validation included), and a hash of the trained weights, which
must be equal for `one` and `ahead` (the same masks in the same order). `intra2` (two intra-op threads, what
`--threads 2` meant for the baseline before) is context only: other bits.

    .venv/bin/python benchmarks/ab_student_masks.py --prepared data/prepared --rounds 5 --epochs 3 \
        --json benchmarks/results/ab_student_masks.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = {  # name: (torch threads while training, draw_ahead, eval threads, distilled)
    "one": (1, False, 1, False),
    "ahead": (1, True, 2, False),
    "intra2": (2, False, 2, False),
    # distilled (--store): the teacher branch in a second thread, one torch thread per branch, as the stage runs it
    # on 2 threads (beside `ahead`: the per-epoch ratio of the two default stages, side by side)
    "distill": (1, False, 2, True),
}


def child(prepared: Path, side: str, epochs: int, store: Path | None) -> dict:
    import torch

    threads, ahead, eval_threads, distilled = SIDES[side]
    torch.set_num_threads(threads)
    from pipeline.data.prepared import load_prepared
    from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
    from pipeline.student.sasrec import SASRec, SasrecConfig
    from pipeline.student.train import TrainConfig, fit

    data = load_prepared(prepared)
    torch.manual_seed(2020)
    model = SASRec(SasrecConfig(n_items=data.n_items))
    objective = None
    if distilled:  # as stages/train_student.py builds it with the defaults (main() checked that --store is given)
        st = open_teacher_store(store, data, None)
        objective = DistillObjective(DistillConfig(seed=2020), data, list(st.shard_paths), model.config.hidden,
                                     model.config.max_len)
    t0 = time.perf_counter()
    res = fit(model, data, TrainConfig(epochs=epochs, patience=epochs + 1), objective=objective, show_progress=False,
              concurrent=distilled, draw_ahead=ahead, eval_threads=eval_threads)
    wall = time.perf_counter() - t0
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return {"side": side, "epoch_seconds": [r["train_seconds"] for r in res.history], "fit_seconds": wall,
            "valid_ndcg@10": [r["valid_ndcg@10"] for r in res.history], "weights_sha256": h.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sides", default="one,ahead,intra2")
    ap.add_argument("--store", type=Path, help="a teacher store of --prepared, for the distill sides")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.prepared, a.child, a.epochs, a.store)))
        return
    sides = a.sides.split(",")
    if unknown := [s for s in sides if s not in SIDES]:
        ap.error(f"unknown side(s) {unknown}; choose from {sorted(SIDES)}")
    if not a.store and any(SIDES[s][3] for s in sides):
        ap.error("the distill side needs --store (a teacher store made from --prepared)")
    runs: list[dict] = []
    for r in range(a.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--prepared", str(a.prepared), "--epochs", str(a.epochs),
                                  "--child", side] + (["--store", str(a.store)] if a.store else []),
                                 capture_output=True, text=True, check=True)
            run = {**json.loads(out.stdout.strip().splitlines()[-1]), "round": r, "load_before": load}
            runs.append(run)
            print(f"round {r} {side:7s} epochs {[round(s, 2) for s in run['epoch_seconds']]} "
                  f"fit {run['fit_seconds']:.1f} s load {load:.2f}", flush=True)
    summary = {}
    for side in sides:
        mine = [x for x in runs if x["side"] == side]
        summary[side] = {"median_epoch_seconds": statistics.median(s for x in mine for s in x["epoch_seconds"]),
                         "median_fit_seconds": statistics.median(x["fit_seconds"] for x in mine),
                         "weights_sha256": sorted({x["weights_sha256"] for x in mine})}
    base = summary[sides[0]]
    for side in sides:
        s = summary[side]
        s["epoch_ratio"] = s["median_epoch_seconds"] / base["median_epoch_seconds"]
        s["fit_ratio"] = s["median_fit_seconds"] / base["median_fit_seconds"]
        # rounds in which this side's fit was faster than the first side's, same round
        s["rounds_faster"] = sum(
            x["fit_seconds"] < y["fit_seconds"] for x in runs if x["side"] == side
            for y in runs if y["side"] == sides[0] and y["round"] == x["round"])
        print(f"{side:7s} median epoch {s['median_epoch_seconds']:.3f} s ({s['epoch_ratio']:.3f}x), "
              f"fit {s['median_fit_seconds']:.2f} s ({s['fit_ratio']:.3f}x), faster in {s['rounds_faster']}/{a.rounds} "
              f"rounds, weights {s['weights_sha256'][0][:12]}{' (varies!)' if len(s['weights_sha256']) > 1 else ''}")
    if a.json:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "cpu": cpu, "nproc": os.cpu_count(),
                                      "epochs": a.epochs, "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
