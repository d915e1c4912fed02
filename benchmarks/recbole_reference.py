"""RecBole 1.2.1 SASRec on MovieLens-100K: the reference the gedistill student must match.

Runs with the RecBole venv (see benchmarks/setup_recbole.sh), not the project's:

    OMP_NUM_THREADS=1 .venv-recbole/bin/python benchmarks/recbole_reference.py --threads 1

It trains RecBole's SASRec with RecBole's default sequential protocol on the ml-100k atomic
files shipped inside the recbole wheel (read in place, never copied), then writes the final
valid/test metrics, per-epoch times and the split facts seen by RecBole's own dataset object
(user/item/interaction counts, the valid/test targets of the first users, mapped back to the
original ids) to a JSON file.

`build()` is also used by benchmarks/bench_student.py to time RecBole's training epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "recbole_sasrec_ml100k.json"


def ml100k_data_path() -> str:
    """The folder that holds `ml-100k/` inside the installed recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("recbole is not installed in this interpreter; run benchmarks/setup_recbole.sh "
                 "and use .venv-recbole/bin/python")
    root = Path(spec.submodule_search_locations[0]) / "dataset_example"
    if not (root / "ml-100k" / "ml-100k.inter").is_file():
        sys.exit(f"ml-100k atomic files not found under {root}")
    return str(root)


def config_dict(epochs: int = 200, stopping_step: int = 10, seed: int = 2020,
                checkpoint_dir: str = "saved", show_progress: bool = False) -> dict:
    """RecBole's default ml-100k sequential protocol with SASRec's default hyperparameters.

    The values below restate RecBole's defaults (properties/model/SASRec.yaml,
    properties/dataset/ml-100k.yaml) so that the protocol is visible here; only the
    evaluation protocol, metrics, loss and the epoch cap are chosen explicitly.
    """
    return {
        "data_path": ml100k_data_path(),
        "dataset": "ml-100k",
        "use_gpu": False,
        "seed": seed,
        "reproducibility": True,
        "checkpoint_dir": checkpoint_dir,
        "show_progress": show_progress,
        # data: every rating is an interaction, no filtering (ml-100k.yaml defaults)
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50,
        # model (SASRec.yaml defaults)
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        # training
        "epochs": epochs,
        "train_batch_size": 2048,
        "learner": "adam",
        "learning_rate": 0.001,
        "train_neg_sample_args": None,  # CE over all items: no sampled negatives
        "eval_step": 1,
        "stopping_step": stopping_step,
        # evaluation: leave-one-out by time, full ranking (history not masked for sequential)
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "group_by": "user",
            "order": "TO",
            "mode": "full",
        },
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10, 20],
        "valid_metric": "NDCG@10",
        "eval_batch_size": 4096,
    }


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def build(threads: int, epochs: int = 200, stopping_step: int = 10, seed: int = 2020,
          workdir: str | None = None, log: bool = True):
    """Config, dataset, dataloaders, model and trainer, exactly as RecBole's run_recbole does.

    RecBole writes ./log/ and ./log_tensorboard/ relative to the working directory, so we
    move into `workdir` (a scratch folder) first.
    """
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    # Importing RecBole's sequential models switches anomaly detection on (DESIGN point 12).
    torch.autograd.set_detect_anomaly(False)
    set_threads(threads)

    cfg = Config(model="SASRec", dataset="ml-100k",
                 config_dict=config_dict(epochs, stopping_step, seed,
                                         checkpoint_dir=str(Path(workdir or ".") / "saved")))
    init_seed(cfg["seed"], cfg["reproducibility"])
    if log:
        init_logger(cfg)
    dataset = create_dataset(cfg)
    train_data, valid_data, test_data = data_preparation(cfg, dataset)
    init_seed(cfg["seed"] + cfg["local_rank"], cfg["reproducibility"])
    model = SASRec(cfg, train_data._dataset).to(cfg["device"])
    trainer = Trainer(cfg, model)
    torch.autograd.set_detect_anomaly(False)
    set_threads(threads)  # init_seed and friends must not have changed it; make sure
    return cfg, dataset, train_data, valid_data, test_data, model, trainer


def split_facts(dataset, valid_data, test_data, n_users: int = 20) -> dict:
    """What RecBole's own dataset object sees, with ids mapped back to the original tokens."""
    uid, iid = dataset.uid_field, dataset.iid_field
    u_tok = dataset.field2id_token[uid]
    i_tok = dataset.field2id_token[iid]

    def targets(loader) -> dict:
        feat = loader._dataset.inter_feat
        users = feat[uid].numpy()
        items = feat[iid].numpy()
        lengths = feat[dataset.item_list_length_field].numpy()
        order = sorted(range(len(users)), key=lambda k: int(u_tok[users[k]]))
        return {
            "rows": int(len(users)),
            "first_users": [
                {"user": str(u_tok[users[k]]), "target_item": str(i_tok[items[k]]),
                 "history_len_used": int(lengths[k])}
                for k in order[:n_users]
            ],
        }

    def digest(loader) -> str:
        # sha256 over "user<TAB>target" lines sorted by user (original ids): lets anyone check
        # a split against RecBole's exactly without copying MovieLens into this repo.
        feat = loader._dataset.inter_feat
        lines = sorted(f"{u_tok[u]}\t{i_tok[i]}" for u, i in
                       zip(feat[uid].numpy(), feat[iid].numpy()))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    inter = dataset.inter_feat
    return {
        "users": int(dataset.user_num - 1),  # RecBole reserves id 0 for padding
        "items": int(dataset.item_num - 1),
        "interactions": int(len(inter)) + int(dataset.user_num - 1),
        "augmented_sequences_total": int(len(inter)),
        "note": ("RecBole's SequentialDataset stores one row per (prefix -> next item); "
                 "interactions = rows + one first item per user. Users/items exclude the "
                 "padding id 0. Ordered by user id then the normalized float32 timestamp."),
        "tie_rule": ("RecBole min-max normalizes timestamps (float64) and stores them as float32, "
                     "then sorts stably by (user, that float32): timestamps about 1 s apart "
                     "collapse and keep file order. Sorting the raw file by (user, "
                     "float32((ts - min) / (max - min)), file line) reproduces every user's "
                     "valid and test target; sorting by the exact timestamp with file-order "
                     "ties differs for 5 valid and 4 test targets (users 167, 186, 239, 392, 444)."),
        "valid_targets_sha256": digest(valid_data),
        "test_targets_sha256": digest(test_data),
        "valid": targets(valid_data),
        "test": targets(test_data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--epochs", type=int, default=200, help="epoch cap (default 200)")
    ap.add_argument("--stopping-step", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workdir", default="/tmp/recbole_ref",
                    help="scratch folder for RecBole's log/, log_tensorboard/ and checkpoint")
    ap.add_argument("--resume", action="store_true",
                    help="continue a stopped run from its last best checkpoint (named in the "
                         "progress JSON, else the newest in WORKDIR/saved); epochs after that "
                         "best are run again, with fresh dropout draws")
    ap.add_argument("--split-only", type=Path, metavar="JSON",
                    help="only write the split facts (seconds, no training) to this file")
    args = ap.parse_args()
    args.out = args.out.resolve()
    if args.split_only:
        path = args.split_only.resolve()
        _, dataset, _, valid_data, test_data, _, _ = build(args.threads, 1, workdir=args.workdir,
                                                           log=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split_facts(dataset, valid_data, test_data), indent=2) + "\n")
        print(f"wrote {path}")
        return

    t0 = time.perf_counter()
    cfg, dataset, train_data, valid_data, test_data, model, trainer = build(
        args.threads, args.epochs, args.stopping_step, args.seed, args.workdir)
    t_setup = time.perf_counter() - t0
    import torch

    facts = split_facts(dataset, valid_data, test_data)
    print(json.dumps({k: facts[k] for k in ("users", "items", "interactions")}), flush=True)

    train_times: list[float] = []
    valid_times: list[float] = []
    valid_scores: list[float] = []
    valid_results: list[dict] = []
    test_at_best: dict = {}
    orig_evaluate = trainer.evaluate
    args.out.parent.mkdir(parents=True, exist_ok=True)
    progress = args.out.with_suffix(".progress.json")
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} "
               f".venv-recbole/bin/python benchmarks/recbole_reference.py "
               f"--threads {args.threads} --epochs {args.epochs} "
               f"--stopping-step {args.stopping_step} --seed {args.seed}")
    orig_train, orig_valid = trainer._train_epoch, trainer._valid_epoch
    resumed_at: list[int] = []
    if args.resume:
        prev = json.loads(progress.read_text()) if progress.is_file() else {}
        ckpt = prev.get("checkpoint") or max(
            (str(p) for p in (Path(args.workdir) / "saved").glob("SASRec-*.pth")),
            key=os.path.getmtime, default=None)
        if not ckpt or not Path(ckpt).is_file():
            sys.exit(f"--resume: no checkpoint found (progress file {progress}, "
                     f"folder {args.workdir}/saved)")
        trainer.resume_checkpoint(ckpt)  # sets start_epoch = best + 1, cur_step, best score
        start = trainer.start_epoch
        valid_results[:] = prev.get("valid_per_epoch", [])[:start]
        valid_scores[:] = [r["ndcg@10"] for r in valid_results]
        train_times[:] = prev.get("train_epoch_s", [])[:start]
        test_at_best.update(prev.get("test_at_best_so_far", {}))
        resumed_at[:] = prev.get("resumed_at", []) + [start]
        if len(valid_results) != start:
            print(f"warning: progress file has {len(valid_results)} of the {start} epochs "
                  f"before the checkpoint", flush=True)
        print(f"resumed from {ckpt} at epoch {start}", flush=True)

    def timed_train(*a, **k):
        s = time.perf_counter()
        r = orig_train(*a, **k)
        train_times.append(time.perf_counter() - s)
        print(f"epoch {len(train_times) - 1}: train {train_times[-1]:.1f}s "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        return r

    def timed_valid(*a, **k):
        s = time.perf_counter()
        r = orig_valid(*a, **k)
        valid_times.append(time.perf_counter() - s)
        valid_scores.append(float(r[0]))
        valid_results.append({k: float(v) for k, v in r[1].items()})
        if valid_scores[-1] >= max(valid_scores):
            # New best (RecBole's rule is >=): the test metrics of this very model are what
            # evaluate(load_best_model=True) will report if nothing better follows. Full-sort
            # evaluation draws no random numbers, so training is not perturbed.
            res = orig_evaluate(test_data, load_best_model=False, show_progress=False)
            test_at_best.clear()
            test_at_best.update({k: float(v) for k, v in res.items()})
        write_progress()
        return r

    def write_progress():
        # A long run on a shared 2-core machine may be stopped before it ends: keep what it
        # has so far (validation per epoch, times) on disk after every epoch.
        best = max(range(len(valid_scores)), key=lambda e: (valid_scores[e], e))
        partial = {
            "status": "running",
            "command": command,
            "checkpoint": str(trainer.saved_model_file),
            "resumed_at": resumed_at,
            "epochs_done": len(valid_scores),
            "best_epoch_so_far": best,
            "best_valid_so_far": valid_results[best],
            "test_at_best_so_far": test_at_best,
            "valid_per_epoch": valid_results,
            "train_epoch_s": [round(t, 3) for t in train_times],
            "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()),
            "split": facts,
        }
        progress.write_text(json.dumps(partial, indent=2) + "\n")

    trainer._train_epoch = timed_train
    trainer._valid_epoch = timed_valid

    t1 = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False)
    t_fit = time.perf_counter() - t1
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)

    epochs_run = len(train_times)
    if best_valid_result is None:  # resumed, and no epoch beat the checkpoint: take the recorded best
        best_i = max(range(len(valid_scores)), key=lambda e: (valid_scores[e], e))
        best_valid_result, best_valid_score = valid_results[best_i], valid_scores[best_i]
    result = {
        "what": "RecBole 1.2.1 SASRec on MovieLens-100K (RecBole's default sequential protocol)",
        "status": "finished",
        "command": command,
        "resumed_at_epochs": resumed_at,
        "valid": {k: float(v) for k, v in best_valid_result.items()},
        "test": {k: float(v) for k, v in test_result.items()},
        "best_valid_ndcg@10": float(best_valid_score),
        # RecBole's early_stopping resets cur_step on value >= best, so the best (last
        # saved) epoch is the last one minus cur_step; epochs are counted from 0.
        "best_epoch": int(epochs_run - 1 - trainer.cur_step),
        "valid_per_epoch": valid_results,
        "epochs_run": epochs_run,
        "stopped_early": epochs_run < args.epochs,
        "time": {
            "setup_s": round(t_setup, 2),
            "fit_s": round(t_fit, 2),
            "train_epoch_s": [round(t, 3) for t in train_times],
            "train_epoch_median_s": round(statistics.median(train_times), 3),
            "valid_epoch_median_s": round(statistics.median(valid_times), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "threads": torch.get_num_threads(),
        "loadavg_end": list(os.getloadavg()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "recbole": __import__("recbole").__version__,
            "numpy": __import__("numpy").__version__,
            "pandas": __import__("pandas").__version__,
        },
        "config": {k: v for k, v in config_dict(args.epochs, args.stopping_step,
                                                 args.seed).items()
                   if k not in ("data_path", "checkpoint_dir", "show_progress")},
        "split": facts,
    }
    result["test_at_best_epoch_during_fit"] = test_at_best  # cross-check of "test"
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    progress.unlink(missing_ok=True)
    print(json.dumps({k: result[k] for k in
                      ("valid", "test", "best_epoch", "epochs_run", "time", "threads")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
