"""Collapse check: which embedding-loss setting keeps ||u_sas|| and ||W_p(h_dec)|| from shrinking together?

    .venv/bin/python benchmarks/collapse_check.py --prepared data/prepared --store data/teacher/default \\
        --epochs 20 --out benchmarks/results/collapse_check.json

Runs `gedistill student-train --teacher-cache STORE` once per setting (emb loss x w_rec x w_rank),
in child processes, and reads each run's per-epoch history (u_norm, proj_norm, l_emb) and its validation
and test metrics. Settings are ranked on validation NDCG@10 (the model each run keeps is its best
validation epoch); test is reported after, never used to choose. Without --store it builds the synthetic cluster world of the transfer-proof test
(tests/distill_helpers.py) with its oracle teacher, so it runs anywhere in about a minute per setting.
Extra student-train options can follow `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SETTINGS = [  # (name, extra args)
    ("mse, w_rec=0, w_rank=0 (L_emb alone)", ["--emb-loss", "mse", "--w-rec", "0", "--w-rank", "0"]),
    ("mse, w_rec=0 (source method)", ["--emb-loss", "mse", "--w-rec", "0"]),
    ("cosine, w_rec=0", ["--emb-loss", "cosine", "--w-rec", "0"]),
    ("standardized, w_rec=0", ["--emb-loss", "standardized", "--w-rec", "0"]),
    ("mse, w_rec=1", ["--emb-loss", "mse", "--w-rec", "1"]),
    ("cosine, w_rec=1", ["--emb-loss", "cosine", "--w-rec", "1"]),
    ("standardized, w_rec=1", ["--emb-loss", "standardized", "--w-rec", "1"]),
]


def synthetic(work: Path) -> tuple[Path, Path, list[str]]:
    from pipeline.data.prepared import load_prepared
    from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world

    world = cluster_world(n_users=150, length=15, n_items=600, n_clusters=30, seed=0)
    write_world(work / "prepared", world)
    fp = load_prepared(work / "prepared").fingerprint
    write_teacher_store(work / "store", cluster_teacher_rows(world), prepared_fingerprint=fp)
    model = ["--hidden", "32", "--blocks", "1", "--heads", "1", "--max-len", "15", "--dropout", "0.2",
             "--batch-size", "32", "--teacher-target", "scores", "--teacher-batch-size", "128"]
    return work / "prepared", work / "store", model


def rank_on_validation(rows: list[dict]) -> list[str]:
    """Setting names, best validation NDCG@10 first. Test NDCG@10 is in each row for the report only."""
    return [r["setting"] for r in sorted(rows, key=lambda r: -r["valid_ndcg@10"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of setting indices (default all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "collapse_check.json")
    ap.add_argument("extra", nargs="*", help="more student-train options (after --)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="collapse_"))
    if a.store is None:
        prepared, store, model_args = synthetic(work)
        data_name = "synthetic cluster world (oracle teacher)"
    else:
        prepared, store, model_args = a.prepared or REPO / "data" / "prepared", a.store, []
        data_name = str(store)
    chosen = [SETTINGS[int(i)] for i in a.only.split(",")] if a.only else SETTINGS
    rows = []
    for name, args in chosen:
        out = work / f"run{len(rows)}"
        cmd = [sys.executable, "-m", "stages.cli", "student-train", "--prepared", str(prepared), "--teacher-cache", str(store),
               "--out", str(out), "--metrics", str(out / "metrics.json"), "--epochs", str(a.epochs),
               "--patience", str(a.epochs), "--threads", str(a.threads), "--seed", "0", *model_args, *args, *a.extra]
        t0 = time.perf_counter()
        env = dict(os.environ, GEDISTILL_NO_PROGRESS="1", OMP_NUM_THREADS=str(a.threads))
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
        hist = json.loads((out / "history.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        valid, test = metrics["valid"], metrics["test"]
        first, last = hist[0], hist[-1]
        rows.append({"setting": name, "args": args, "seconds": time.perf_counter() - t0,
                     "u_norm": [first["u_norm"], last["u_norm"]], "proj_norm": [first["proj_norm"], last["proj_norm"]],
                     "l_emb": [first["l_emb"], last["l_emb"]],
                     "u_spread": [first.get("u_spread"), last.get("u_spread")],
                     "proj_spread": [first.get("proj_spread"), last.get("proj_spread")], "min_u_norm": min(r["u_norm"] for r in hist),
                     "min_proj_norm": min(r["proj_norm"] for r in hist), "valid_ndcg@10": valid["ndcg@10"],
                     "valid_hr@10": valid["hr@10"], "test_ndcg@10": test["ndcg@10"],
                     "test_hr@10": test["hr@10"], "best_epoch": metrics["best_epoch"]})
        r = rows[-1]
        print(f"{name:40} |u| {r['u_norm'][0]:7.3f} -> {r['u_norm'][1]:7.3f}   |W_p h| {r['proj_norm'][0]:7.3f} -> "
              f"{r['proj_norm'][1]:7.3f}   spread u {r['u_spread'][0]:.3f} -> {r['u_spread'][1]:.3f}, W_p h "
              f"{r['proj_spread'][0]:.3f} -> {r['proj_spread'][1]:.3f}   L_emb {r['l_emb'][0]:8.4f} -> {r['l_emb'][1]:8.4f}   "
              f"valid NDCG@10 {r['valid_ndcg@10']:.4f}   test NDCG@10 {r['test_ndcg@10']:.4f}", flush=True)
    ranking = rank_on_validation(rows)
    print("ranked on validation NDCG@10 (test reported, not used): " + " > ".join(ranking))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"data": data_name, "epochs": a.epochs, "command": "python benchmarks/collapse_check.py "
                                 + " ".join(sys.argv[1:]), "selection": "validation NDCG@10",
                                 "ranking_by_validation": ranking, "runs": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
