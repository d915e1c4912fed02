"""Ablation of the distillation losses, selected on validation only (issue 13).

Does the decision state carry anything beyond the ranking? From one teacher store, train the
student three ways with params.yaml's baseline and distill settings, changing only the loss weights:

  listnet    --lambda-emb 0            (the teacher's ranking alone)
  embedding  --w-rank 0                (the projected h_dec alone)
  both       params.yaml's weights     (reused from an existing checkpoint with --both DIR)

Each variant is compared with the baseline by `gedistill evaluate` (paired bootstrap CIs on the
test users). The variant chosen is the one with the best *validation* NDCG@10 (the student's own
early-stopping metric); its test numbers are reported as they come out, the others beside it.

    python benchmarks/ablation.py --workdir . --store tuned/data/teacher \
        --both tuned/data/students/distilled --out tuned/data/ablation

Runs the installed `gedistill` (what users run), one variant after another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VARIANTS = {"listnet": {"lambda_emb": 0.0}, "embedding": {"w_rank": 0.0}, "both": {}}


def train_cmd(p: dict, store: str, out: Path, name: str, overrides: dict) -> list[str]:
    b, d = p["baseline"], {**p["distill"], **overrides}
    return ["gedistill", "student-train", "--prepared", "data/prepared", "--teacher-cache", store,
            "--candidates", "data/candidates/candidates.parquet", "--run-name", f"ablation-{name}",
            "--out", str(out / "students" / name), "--metrics", str(out / f"{name}.student.json"),
            "--hidden", str(b["hidden"]), "--blocks", str(b["blocks"]), "--heads", str(b["heads"]),
            "--max-len", str(b["max_len"]), "--dropout", str(b["dropout"]), "--loss", b["loss"],
            "--epochs", str(b["epochs"]), "--batch-size", str(b["batch_size"]), "--lr", str(b["lr"]),
            "--patience", str(b["patience"]), "--w-rec", str(d["w_rec"]), "--w-rank", str(d["w_rank"]),
            "--lambda-emb", str(d["lambda_emb"]), "--emb-loss", d["emb_loss"],
            "--teacher-target", d["teacher_target"], "--teacher-temperature", str(d["teacher_temperature"]),
            "--init", d["init"], "--baseline", "data/students/baseline", "--seed", str(d["seed"]),
            "--threads", str(d["threads"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("."))
    ap.add_argument("--store", default="tuned/data/teacher")
    ap.add_argument("--both", type=Path, default=None, help="existing checkpoint trained with params.yaml's weights")
    ap.add_argument("--both-metrics", type=Path, default=None, help="its student metrics JSON")
    ap.add_argument("--out", type=Path, default=Path("data/ablation"))
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    wd = args.workdir.resolve()
    params = yaml.safe_load((wd / "params.yaml").read_text())
    out = args.out
    (wd / out).mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, overrides in VARIANTS.items():
        ckpt, smetrics = out / "students" / name, out / f"{name}.student.json"
        if name == "both" and args.both is not None:
            ckpt, smetrics = args.both, args.both_metrics or Path("data/metrics") / f"{args.both.name}.json"
        elif not (wd / smetrics).exists():
            t0 = time.perf_counter()
            subprocess.run(train_cmd(params, args.store, out, name, overrides), cwd=wd, check=True)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        emetrics = out / f"{name}.evaluate.json"
        if not (wd / emetrics).exists():
            subprocess.run(["gedistill", "evaluate", "--prepared", "data/prepared", "--baseline", "data/students/baseline",
                            "--distilled", str(ckpt), "--metrics", str(emetrics), "--plots", str(out / f"plots-{name}"),
                            "--n-boot", str(args.n_boot), "--seed", str(params["evaluate"]["seed"])], cwd=wd, check=True)
        s = json.loads((wd / smetrics).read_text())
        e = json.loads((wd / emetrics).read_text())
        nd = e["difference"]["ndcg@10"]
        rows[name] = {"weights": {**{k: params["distill"][k] for k in ("w_rec", "w_rank", "lambda_emb")}, **overrides},
                      "valid_ndcg@10": s["valid"]["ndcg@10"], "best_epoch": s["best_epoch"],
                      "test_ndcg@10": e["test"]["distilled"]["ndcg@10"], "baseline_test_ndcg@10": e["test"]["baseline"]["ndcg@10"],
                      "diff": nd["diff"], "ci": [nd["ci_low"], nd["ci_high"]], "verdict": e["verdict"]["ndcg@10"]}
    chosen = max(rows, key=lambda n: rows[n]["valid_ndcg@10"])
    result = {"store": args.store, "selected_on_validation": chosen, "variants": rows}
    (wd / out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<10} {'valid@10':>9} {'test@10':>8} {'vs baseline':>12}  95% CI              verdict")
    for n, r in rows.items():
        mark = "*" if n == chosen else " "
        print(f"{n:<9}{mark} {r['valid_ndcg@10']:9.4f} {r['test_ndcg@10']:8.4f} {r['diff']:+12.4f}  "
              f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]  {r['verdict']}")
    print(f"* selected on validation NDCG@10; baseline test NDCG@10 {rows[chosen]['baseline_test_ndcg@10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
