"""Baseline-student settings compared over several seeds, selected on validation.

    .venv/bin/python benchmarks/sweep_student.py --name maxlen200 --max-len 200 --seeds 2020 1 2

Each run trains `pipeline.student.train.fit` on data/prepared (made by `gedistill prepare`) at one torch
thread (defaults: the project's, from SasrecConfig/TrainConfig) and appends one JSON line per seed to benchmarks/results/sweep_student.jsonl: the settings,
best epoch, epochs run, seconds, and unmasked valid/test metrics. `--summary` prints the mean and
standard error per setting name, ranked by validation NDCG@10 (the selection criterion), test after;
`--summary --seeds 2020 1 2` compares every setting over the same seeds (not every setting in the
recorded file ran three: see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "sweep_student.jsonl"


def summary(path: Path, seeds: list[int] | None = None) -> list[str]:
    """Print one row per setting, ranked by mean validation NDCG@10 (the selection criterion); test is
    reported after and never used to rank. Settings that ran other seeds than the others are not
    comparable on a mean: `seeds` restricts every setting to those seeds, and the `seeds` column
    shows what each row averages. Returns the setting names in rank order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if seeds:
        rows = [r for r in rows if r["seed"] in seeds]
    names = list(dict.fromkeys(r["name"] for r in rows))

    def mean(rs: list[dict], split: str, key: str) -> float:
        return statistics.mean(r[split][key] for r in rs)

    ranked = sorted(names, key=lambda n: -mean([r for r in rows if r["name"] == n], "valid", "ndcg@10"))
    print(f"ranked by validation NDCG@10{' over seeds ' + ' '.join(map(str, seeds)) if seeds else ''}; "
          "test reported after, not used to choose")
    print(f"{'setting':<38}{'seeds':<16}{'valid ndcg@10':>15} {'test ndcg@10':>15} {'test hr@10':>15} {'epochs':>7} {'s/run':>7}")
    for n in ranked:
        rs = [r for r in rows if r["name"] == n]

        def ms(key: str, split: str) -> str:
            v = [r[split][key] for r in rs]
            se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
            return f"{statistics.mean(v):.4f}±{se:.4f}"
        ep = statistics.mean(r["epochs_run"] for r in rs)
        sec = statistics.mean(r["seconds"] for r in rs)
        seed_list = ",".join(str(r["seed"]) for r in rs)
        other = {r.get("prepared") for r in rs} - {None, str(REPO / "data" / "prepared")}
        n = n + (" (other data)" if other else "")  # e.g. RecBole's split: not a candidate for the same choice
        print(f"{n:<38}{seed_list:<16}{ms('ndcg@10', 'valid'):>15} {ms('ndcg@10', 'test'):>15} "
              f"{ms('hr@10', 'test'):>15} {ep:>7.0f} {sec:>7.0f}")
    return ranked


def main() -> None:
    from pipeline.student.sasrec import SasrecConfig
    from pipeline.student.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name")
    p.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    p.add_argument("--seeds", type=int, nargs="+", default=[2020, 1, 2])
    p.add_argument("--max-len", type=int, default=SasrecConfig.max_len)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--dropout", type=float, default=SasrecConfig.dropout)
    p.add_argument("--attn-dropout", type=float, default=None)
    p.add_argument("--patience", type=int, default=TrainConfig.patience)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--summary", action="store_true",
                   help="print --out's settings ranked by validation and exit (with --seeds given: over those seeds only)")
    a = p.parse_args()
    if a.summary:
        given = any(arg.startswith("--seeds") for arg in __import__("sys").argv[1:])
        summary(a.out, a.seeds if given else None)
        return
    if not a.name:
        p.error("--name is required unless --summary")

    import torch

    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec
    from pipeline.student.train import evaluate, fit

    torch.set_num_threads(a.threads)
    data = load_prepared(a.prepared)
    for seed in a.seeds:
        torch.manual_seed(seed)
        cfg = SasrecConfig(n_items=data.n_items, max_len=a.max_len, dropout=a.dropout,
                           attn_dropout=a.dropout if a.attn_dropout is None else a.attn_dropout)
        model = SASRec(cfg)
        tcfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, stride=a.stride,
                           patience=a.patience, seed=seed)
        t0 = time.perf_counter()
        res = fit(model, data, tcfg, show_progress=False)
        row = {"name": a.name, "prepared": str(a.prepared), "fingerprint": data.fingerprint, "seed": seed,
               "max_len": a.max_len, "stride": a.stride, "batch_size": a.batch_size, "lr": a.lr, "dropout": cfg.dropout, "attn_dropout": cfg.attn_dropout, "patience": a.patience,
               "best_epoch": res.best_epoch, "epochs_run": len(res.history),
               "seconds": round(time.perf_counter() - t0, 1),
               "valid": evaluate(model, data, "valid"), "test": evaluate(model, data, "test")}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("name", "seed", "best_epoch", "seconds")}),
              "valid", round(row["valid"]["ndcg@10"], 4), "test", round(row["test"]["ndcg@10"], 4),
              round(row["test"]["hr@10"], 4), flush=True)


if __name__ == "__main__":
    main()
