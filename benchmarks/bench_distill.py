"""Distilled vs baseline training: seconds per epoch side by side, and peak memory as the store grows.

    .venv/bin/python benchmarks/bench_distill.py --threads 1 --epochs 3

Data: the prepared MovieLens-100K (`--prepared`, default data/prepared; run `gedistill prepare`
first). Teacher stores are synthetic but contract-shaped (written with pipeline.store's writer):
random candidates holding the target, a random ranking and scores, random h_dec rows.

1. Epoch time. `pipeline.student.train.fit` with the project defaults (hidden 64, 2 blocks, max length
   50, full-softmax CE; TrainConfig's batch: 64 windows when the recorded results were measured, 16 since), baseline and distilled alternating in fresh child
   processes, `--epochs` epochs each; a side's figure is the median of `history[].train_seconds`
   (validation excluded). The distilled store: the last `--last-m` training positions of every
   user, K=20, h_dec width `--width` (576 = the default teacher) in float16.
   Also, in one child, `--steps` baseline and distilled optimizer steps interleaved (the same
   batches' cost, so machine load hits both sides alike): the ratio of median step times.
2. Peak memory. One child per store size (`--factors`, default 1, 4, 16 times `--mem-rows`
   rows of width `--mem-width`, default 4096 = a 7B teacher), each training the distilled
   objective (SASRec forward/backward + projector, Adam) until the stream has read the whole
   store once. Peak RSS per child (VmHWM); the goal is flat.

3. Issue 10 (`--parts variants,fit,breakdown --store DIR`, e.g. a default run's data/teacher): the student code
   before its speed changes (torch's dropout and SDPA in training, the next-item loss's in-place column 0) against
   as it is. `variants`: the four steps (before/after x baseline/distilled) interleaved in one process, each
   training its own model from the same seed, losses compared bit for bit. `fit`: the real loop, `--epochs`
   epochs per fresh process, before and after alternating, `--rounds` rounds; histories compared.
   `breakdown --variant before|after`: where a distilled step's time goes.
4. `--parts concurrent --store DIR`: the real loop, `--epochs` epochs per fresh process, `--rounds` rounds of
   three: the baseline on 1 thread, the distilled student on 1 thread, and the distilled student with its teacher
   branch in a second thread (`fit(concurrent=True)`, what `student-train --threads 2` does: one torch thread per
   branch). Median seconds per epoch (validation excluded), process CPU seconds per epoch, and whether the two
   distilled histories are identical (they must be).

Each child sets torch threads; the parent records the machine's load average around each child
(DESIGN.md point 11: on a shared 2-core machine, threads fight). Results go to
benchmarks/results/bench_distill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK = "BENCH_JSON "
sys.path.insert(0, str(REPO))


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM belongs to the process's own address space, whereas
    getrusage's ru_maxrss survives exec and so would include the parent's RSS at fork time."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def write_synthetic_store(root: Path, prepared_dir: Path, *, last_m: int, repeat: int, width: int,
                          k: int = 20, shard_rows: int = 8192, seed: int = 0) -> dict:
    """Samples = the last `last_m` training positions per user, repeated `repeat` times; written shard by shard."""
    import pyarrow as pa

    from pipeline.data.prepared import load_prepared
    from pipeline.store import StoreSpec, StoreWriter

    data = load_prepared(prepared_dir)
    rng = np.random.default_rng(seed)
    users, pos = [], []
    for u, s in enumerate(data.train):
        for p in range(max(1, len(s) - last_m), len(s)):
            users.append(u)
            pos.append(p)
    users = np.tile(np.array(users, np.int64), repeat)
    pos = np.tile(np.array(pos, np.int64), repeat)
    n = len(users)
    settings = {"k": k, "prepared_fingerprint": data.fingerprint, "candidates_fingerprint": "synthetic-benchmark",
                "teacher": {"name": "synthetic", "hidden_size": width}}
    spec = StoreSpec(settings, n, shard_rows, width, "float16")
    writer = StoreWriter(root, spec)
    for i in range(spec.n_shards):
        a, b = spec.shard_range(i)
        m = b - a
        target = np.array([data.train[u][p] for u, p in zip(users[a:b], pos[a:b])], np.int32)
        cands = rng.integers(1, data.n_items + 1, size=(m, k)).astype(np.int32)
        cands[np.arange(m), rng.integers(0, k, size=m)] = target
        ranking = np.argsort(rng.random((m, k)), axis=1).astype(np.int16)
        h = rng.standard_normal((m, width), dtype=np.float32).astype(np.float16)
        table = pa.table({
            "sample_id": pa.array(np.arange(a, b), pa.int64()),
            "user_idx": pa.array(users[a:b], pa.int32()),
            "position": pa.array(pos[a:b], pa.int32()),
            "target": pa.array(target, pa.int32()),
            "candidates": pa.FixedSizeListArray.from_arrays(pa.array(cands.reshape(-1)), k).cast(pa.list_(pa.int32())),
            "ranking": pa.FixedSizeListArray.from_arrays(pa.array(ranking.reshape(-1)), k).cast(pa.list_(pa.int16())),
            "scores": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(m * k).astype(np.float32)), k)
                .cast(pa.list_(pa.float32())),
            "h_dec": pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1), pa.float16()), width),
            "status": pa.array(["ok"] * m, pa.string()),
            "prompt_tokens": pa.array(np.full(m, 400, np.int32)),
            "truncated": pa.array(np.zeros(m, bool)),
            "prompt": pa.array([None] * m, pa.string()),
            "generated": pa.array([None] * m, pa.string()),
        })
        writer.write_shard(i, table)
        del table, h
    writer.write_manifest()
    size = sum(p.stat().st_size for p in root.glob("part-*.parquet"))
    return {"rows": n, "width": width, "bytes_on_disk": size, "h_dec_bytes": n * width * 2}


# ---------------------------------------------------------------- children
def child_epochs(a: argparse.Namespace) -> dict:
    import torch

    from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig
    from pipeline.student.train import TrainConfig, fit

    _threads(a.threads)
    if a.variant == "before":
        _use_before()
    data = load_prepared(a.prepared)
    mcfg = SasrecConfig(n_items=data.n_items)
    tcfg = TrainConfig(epochs=a.epochs, patience=a.epochs + 1, seed=a.seed)
    torch.manual_seed(a.seed)
    model = SASRec(mcfg)
    objective = None
    if a.child == "distilled":
        info = open_teacher_store(a.store, data)
        dcfg = DistillConfig(teacher_batch_size=a.teacher_batch_size, emb_loss="cosine")
        objective = DistillObjective(dcfg, data, list(info.shard_paths), mcfg.hidden, mcfg.max_len)
    cpu0 = time.process_time()
    result = fit(model, data, tcfg, objective=objective, show_progress=False, concurrent=a.concurrent)
    cpu_s = time.process_time() - cpu0
    return {"side": a.child, "variant": a.variant, "concurrent": a.concurrent, "cpu_s_per_epoch": cpu_s / len(result.history),
            "epoch_s": [float(r["train_seconds"]) for r in result.history],
            "history": [{k: v for k, v in r.items() if k != "train_seconds"} for r in result.history],
            "teacher_batch_size": a.teacher_batch_size if objective else None,
            "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def _step_setup(a: argparse.Namespace, foreach: bool | None = None):
    """What the step-level children share: the data, a fresh SASRec, the distillation objective over the
    store, one Adam over both, the training windows and a seeded generator."""
    import torch

    from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig
    from pipeline.data.sequences import training_windows
    from pipeline.student.train import TrainConfig

    _threads(a.threads)
    data = load_prepared(a.prepared)
    mcfg, tcfg = SasrecConfig(n_items=data.n_items), TrainConfig()
    torch.manual_seed(a.seed)
    model = SASRec(mcfg).train()
    obj = DistillObjective(DistillConfig(teacher_batch_size=a.teacher_batch_size), data,
                           list(open_teacher_store(a.store, data).shard_paths), mcfg.hidden, mcfg.max_len)
    from pipeline.student import sasrec

    if foreach is None:  # as fit() builds it
        foreach = True if sasrec.FAST_TRAIN_OPS else None
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=1e-3, foreach=foreach)
    X, Y = (torch.from_numpy(x) for x in training_windows(data.train, mcfg.max_len))
    gen = torch.Generator().manual_seed(a.seed)
    return data, model, obj, opt, X, Y, gen, tcfg


def child_steps(a: argparse.Namespace) -> dict:
    """Baseline and distilled optimizer steps interleaved in one process: load hits both alike."""
    import torch

    from pipeline.student.train import next_item_loss

    _, model, obj, opt, X, Y, gen, tcfg = _step_setup(a)
    times: dict[str, list[float]] = {"baseline": [], "distilled": []}
    for i in range(a.steps + 3):
        for side in ("baseline", "distilled"):
            idx = torch.randint(0, len(X), (tcfg.batch_size,), generator=gen)
            t0 = time.perf_counter()
            loss = next_item_loss(model, X[idx], Y[idx], "ce", 1, gen)
            if side == "distilled":
                loss = loss + obj.loss(model, i)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 3:  # warm-up steps are not counted
                times[side].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_step_s": med, "ratio_distilled_over_baseline": med["distilled"] / med["baseline"],
            "steps": a.steps, "steps_per_epoch": (len(X) + tcfg.batch_size - 1) // tcfg.batch_size,
            "threads": torch.get_num_threads()}


def _old_next_item_loss(model, x, y, kind, n_neg, gen):
    """pipeline.student.train.next_item_loss before issue 10's change (its CE branch): the logits' column 0 set to
    -inf in place, whose backward copies the whole [M, N+1] gradient."""
    import torch.nn.functional as F

    assert kind == "ce"
    h = model.encode(x)[y != 0]
    t = y[y != 0]
    logits = h @ model.item_emb.weight.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, t)


def _use_before() -> None:
    """This process runs the student code as it was before issue 10's speed changes: torch's own dropout and
    SDPA in training and Adam's per-parameter loop (sasrec.FAST_TRAIN_OPS off), and the old next-item loss."""
    from pipeline.student import sasrec, train

    sasrec.FAST_TRAIN_OPS = False
    train.next_item_loss = _old_next_item_loss


def child_variants(a: argparse.Namespace) -> dict:
    """Before vs after issue 10's speed changes, baseline and distilled optimizer steps, all four interleaved in one
    process (the order of before/after alternating per round) on the real store. Each of the four trains its own
    model from the same seed on the same batches, with its own copy of the global RNG state (dropout), so before
    and after must give the same loss, bit for bit, at every step: checked and recorded."""
    import torch

    from pipeline.student import sasrec, train

    new_loss = train.next_item_loss
    runs = {}
    for var in ("before", "after"):
        for side in ("baseline", "distilled"):
            data, model, obj, opt, X, Y, gen, tcfg = _step_setup(a, foreach=True if var == "after" else False)
            runs[(var, side)] = {"model": model, "obj": obj, "opt": opt, "gen": gen, "rng": torch.get_rng_state(),
                                 "times": [], "losses": []}
    for i in range(a.steps + 3):
        for var in (("before", "after") if i % 2 else ("after", "before")):
            sasrec.FAST_TRAIN_OPS = var == "after"
            nil = new_loss if var == "after" else _old_next_item_loss
            for side in ("baseline", "distilled"):
                r = runs[(var, side)]
                torch.set_rng_state(r["rng"])
                idx = torch.randint(0, len(X), (tcfg.batch_size,), generator=r["gen"])
                t0 = time.perf_counter()
                loss = nil(r["model"], X[idx], Y[idx], "ce", 1, r["gen"])
                if side == "distilled":
                    loss = loss + r["obj"].loss(r["model"], i)[0]
                r["opt"].zero_grad(set_to_none=True)
                loss.backward()
                r["opt"].step()
                dt = time.perf_counter() - t0
                r["rng"] = torch.get_rng_state()
                r["losses"].append(loss.item())
                if i >= 3:  # warm-up steps are not counted
                    r["times"].append(dt)
    sasrec.FAST_TRAIN_OPS = True
    med = {f"{v}/{s}": statistics.median(r["times"]) for (v, s), r in runs.items()}
    same = {s: runs[("before", s)]["losses"] == runs[("after", s)]["losses"] for s in ("baseline", "distilled")}
    return {"median_step_s": med,
            "ratio_distilled_over_baseline": {v: med[f"{v}/distilled"] / med[f"{v}/baseline"] for v in ("before", "after")},
            "after_over_before": {s: med[f"after/{s}"] / med[f"before/{s}"] for s in ("baseline", "distilled")},
            "losses_bit_identical": same, "losses_first_5": {f"{v}/{s}": r["losses"][:5] for (v, s), r in runs.items()},
            "steps": a.steps, "teacher_batch_size": a.teacher_batch_size, "threads": torch.get_num_threads()}


def child_breakdown(a: argparse.Namespace) -> dict:
    """Where a distilled step's extra time goes: baseline and distilled steps interleaved in one process,
    each part of the distilled step timed by wrapping the objective's own methods and the functions it calls
    (no copy of its code): teacher batch draw (the stream: Arrow decoding and the shuffle buffer), histories
    (rebuilt from the training sequences), targets (ranks, teacher distribution), the student's encoding of the
    teacher histories, the candidates' scores, importance weights, ListNet, the projector, the embedding loss,
    the rest of the objective (tensor conversion of the batch, the collapse-check logs), backward and the
    optimizer step. Plus one validation pass (what every epoch adds on both sides)."""
    import torch

    from pipeline.student.train import evaluate, next_item_loss

    if a.variant == "before":
        _use_before()
    from pipeline.student import train

    next_item_loss = train.next_item_loss  # noqa: F811 (the variant's)
    data, model, obj, opt, X, Y, gen, tcfg = _step_setup(a)
    acc: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    from pipeline.student import distill as distill_mod

    batches = obj._batches
    obj._batches = iter(timed("draw", lambda: next(batches)), None)
    obj._histories = timed("histories", obj._histories)
    obj.targets = timed("targets", obj.targets)
    for name in ("importance_weights", "listnet_loss", "embedding_loss"):  # the names distill.py calls
        setattr(distill_mod, name, timed(name, getattr(distill_mod, name)))
    obj.projector.forward = timed("projector", obj.projector.forward)
    model.score_items = timed("candidate_scores", model.score_items)
    enc = model.user_embedding
    parts: dict[str, dict[str, list[float]]] = {"baseline": {}, "distilled": {}}
    for i in range(a.steps + 3):
        for side in ("baseline", "distilled"):
            idx = torch.randint(0, len(X), (tcfg.batch_size,), generator=gen)
            acc.clear()
            t0 = time.perf_counter()
            loss = next_item_loss(model, X[idx], Y[idx], "ce", 1, gen)
            t1 = time.perf_counter()
            if side == "distilled":
                model.user_embedding = timed("teacher_encode", enc)
                loss = loss + obj.loss(model, i)[0]
                del model.user_embedding
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            if i < 3:  # warm-up steps are not counted
                continue
            row = {"rec_forward": t1 - t0, "backward": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}
            if side == "distilled":
                row.update(acc)
                row["objective_rest"] = (t2 - t1) - sum(acc.values())
            for k, v in row.items():
                parts[side].setdefault(k, []).append(v)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in parts.items()}
    t0 = time.perf_counter()
    evaluate(model, data, "valid")
    eval_s = time.perf_counter() - t0
    steps_per_epoch = (len(X) + tcfg.batch_size - 1) // tcfg.batch_size
    return {"median_s": med, "ratio_distilled_over_baseline": med["distilled"]["step"] / med["baseline"]["step"],
            "validation_pass_s": eval_s, "steps": a.steps, "steps_per_epoch": steps_per_epoch,
            "teacher_batch_size": a.teacher_batch_size, "variant": a.variant, "threads": torch.get_num_threads()}


def child_stream(a: argparse.Namespace) -> dict:
    """Teacher-batch draws from a store that fits in the buffer: the in-memory replay against the streaming
    path (re-reading and decoding the Parquet row groups every pass), interleaved in one process, one
    epoch's worth of draws (151 steps at the default batch of 16 windows) per round."""
    from pipeline.store import open_store
    from pipeline.student.teacher_stream import TeacherStream

    shards = list(open_store(a.store, checksums=False).shard_paths)
    streams = {"replay (after)": TeacherStream(shards, a.teacher_batch_size, seed=0),
               "re-read (before)": TeacherStream(shards, a.teacher_batch_size, seed=0)}
    streams["re-read (before)"]._cache = None
    its = {k: iter(s) for k, s in streams.items()}
    times: dict[str, list[float]] = {k: [] for k in its}
    for r in range(a.steps + 1):
        for k, it in its.items():
            t0 = time.perf_counter()
            for _ in range(151):
                next(it)
            if r:  # the first epoch (the replay's one real read) is not counted
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s_per_151_draws": med, "epochs": a.steps, "passes": {k: s.passes for k, s in streams.items()},
            "teacher_batch_size": a.teacher_batch_size}


def child_memory(a: argparse.Namespace) -> dict:
    import torch

    from pipeline.student.distill import DistillConfig, DistillObjective, open_teacher_store
    from pipeline.data.prepared import load_prepared
    from pipeline.student.sasrec import SASRec, SasrecConfig

    _threads(a.threads)
    data = load_prepared(a.prepared)
    rss0 = _peak_rss_mib()
    info = open_teacher_store(a.store, data)  # verifies every shard's sha256 (a streaming read)
    mcfg = SasrecConfig(n_items=data.n_items)
    torch.manual_seed(a.seed)
    model = SASRec(mcfg)
    dcfg = DistillConfig(teacher_batch_size=a.teacher_batch_size, buffer_rows=a.buffer_rows, emb_loss="cosine")
    obj = DistillObjective(dcfg, data, list(info.shard_paths), mcfg.hidden, mcfg.max_len)
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=1e-3)
    t0, steps = time.perf_counter(), 0
    while obj.stream.passes < 1:  # until the whole store has been read once
        loss, _ = obj.loss(model, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return {"rows": info.n_rows, "rows_read": obj.stream.rows_read, "steps": steps,
            "seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(),
            "peak_rss_before_store_mib": rss0, "buffer_rows": a.buffer_rows, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- parent
def run_child(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               GEDISTILL_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, text=True, timeout=3600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"child failed (exit {p.returncode}): {args}\n{p.stdout[-2000:]}")
    d = json.loads(lines[-1][len(MARK):])
    d.update(wall_s=time.perf_counter() - t0, load_before=load0, load_after=os.getloadavg()[0])
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="baseline/distilled alternations")
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--last-m", type=int, default=5, help="teacher samples per user for the timing store")
    ap.add_argument("--width", type=int, default=576, help="h_dec width for the timing store")
    ap.add_argument("--teacher-batch-size", type=int, default=32)
    ap.add_argument("--mem-rows-m", type=int, default=5, help="per-user samples of the 1x memory store")
    ap.add_argument("--mem-width", type=int, default=4096)
    ap.add_argument("--buffer-rows", type=int, default=4096)
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--parts", default="epochs,steps,memory")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_distill.json")
    ap.add_argument("--steps", type=int, default=40, help="interleaved steps per side (part 'steps')")
    ap.add_argument("--variant", choices=["before", "after"], default="after",
                    help="the student code before issue 10's speed changes, or as it is (parts epochs, breakdown)")
    ap.add_argument("--concurrent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["baseline", "distilled", "memory", "steps", "breakdown", "stream", "variants"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help="an existing teacher store (e.g. a default run's data/teacher) for the "
                    "steps/breakdown/stream/variants parts instead of a synthetic one; read only")
    a = ap.parse_args()
    if a.child:
        fn = {"memory": child_memory, "steps": child_steps, "breakdown": child_breakdown, "stream": child_stream,
              "variants": child_variants}.get(a.child, child_epochs)
        print(MARK + json.dumps(fn(a)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    real = a.store
    common = ["--prepared", str(a.prepared), "--threads", str(a.threads), "--seed", str(a.seed),
              "--teacher-batch-size", str(a.teacher_batch_size), "--variant", a.variant]
    res: dict = {"store": str(real) if real else "synthetic", "load_start": os.getloadavg(), "command": "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:]),
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "threads": a.threads}
    try:
        if "epochs" in a.parts:
            store = work / "timing"
            res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            runs: dict[str, list] = {"baseline": [], "distilled": []}
            for r in range(a.rounds):
                for side in ("baseline", "distilled"):
                    print(f"[bench] {side} round {r}, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                    runs[side].append(run_child(["--child", side, "--store", str(store), "--epochs", str(a.epochs), *common],
                                                a.threads))
            med = {s: statistics.median([t for d in v for t in d["epoch_s"]]) for s, v in runs.items()}
            res["epochs"] = {"runs": runs, "median_epoch_s": med, "ratio_distilled_over_baseline": med["distilled"] / med["baseline"]}
        if "steps" in a.parts:
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            print(f"[bench] interleaved steps, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
            res["steps"] = run_child(["--child", "steps", "--store", str(store), "--steps", str(a.steps), *common], a.threads)
        if "breakdown" in a.parts:
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            print(f"[bench] step breakdown, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
            res["breakdown"] = run_child(["--child", "breakdown", "--store", str(store), "--steps", str(a.steps),
                                          *common], a.threads)
        if "variants" in a.parts:
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            print(f"[bench] before/after steps interleaved, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
            res["variants"] = run_child(["--child", "variants", "--store", str(store), "--steps", str(a.steps), *common],
                                        a.threads)
        if "fit" in a.parts:  # the real loop (fit), before and after alternating in fresh processes, same seed
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            fits: dict[str, list] = {}
            base = [c for c in common if c not in ("before", "after", "--variant")]
            for r in range(a.rounds):
                for side in ("baseline", "distilled"):
                    for var in (("before", "after") if r % 2 == 0 else ("after", "before")):
                        print(f"[bench] fit {side} {var} round {r}, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                        fits.setdefault(f"{var}/{side}", []).append(run_child(
                            ["--child", side, "--store", str(store), "--epochs", str(a.epochs), *base, "--variant", var],
                            a.threads))
            med = {k: statistics.median([t for d in v for t in d["epoch_s"]]) for k, v in fits.items()}
            res["fit"] = {
                "runs": fits, "median_epoch_s": med,
                "ratio_distilled_over_baseline": {v: med[f"{v}/distilled"] / med[f"{v}/baseline"] for v in ("before", "after")},
                "after_over_before": {s: med[f"after/{s}"] / med[f"before/{s}"] for s in ("baseline", "distilled")},
                "histories_identical": {s: all(d["history"] == fits[f"before/{s}"][0]["history"]
                                               for v in ("before", "after") for d in fits[f"{v}/{s}"])
                                        for s in ("baseline", "distilled")}}
        if "concurrent" in a.parts:  # the real loop: baseline, distilled, distilled with the branch in a second thread
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            base = ["--prepared", str(a.prepared), "--threads", "1", "--seed", str(a.seed),
                    "--teacher-batch-size", str(a.teacher_batch_size), "--variant", a.variant]
            sides = {"baseline": ["--child", "baseline"], "distilled": ["--child", "distilled"],
                     "distilled_concurrent": ["--child", "distilled", "--concurrent"]}
            conc: dict[str, list] = {k: [] for k in sides}
            for r in range(a.rounds):
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    print(f"[bench] {name} round {r}, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                    conc[name].append(run_child([*sides[name], "--store", str(store), "--epochs", str(a.epochs), *base], 1))
            med = {k: statistics.median([t for d in v for t in d["epoch_s"]]) for k, v in conc.items()}
            cpu = {k: statistics.median([d["cpu_s_per_epoch"] for d in v]) for k, v in conc.items()}
            res["concurrent"] = {
                "runs": conc, "median_epoch_s": med, "median_cpu_s_per_epoch": cpu,
                "ratio_over_baseline": {k: med[k] / med["baseline"] for k in ("distilled", "distilled_concurrent")},
                "concurrent_over_sequential": med["distilled_concurrent"] / med["distilled"],
                "distilled_histories_identical": all(d["history"] == conc["distilled"][0]["history"]
                                                     for k in ("distilled", "distilled_concurrent") for d in conc[k])}
        if "stream" in a.parts:
            store = real or work / "timing"
            if not store.exists():
                res["timing_store"] = write_synthetic_store(store, a.prepared, last_m=a.last_m, repeat=1, width=a.width)
            res["stream"] = run_child(["--child", "stream", "--store", str(store), "--steps", str(a.steps), *common],
                                      a.threads)
        if "memory" in a.parts:
            res["memory"] = []
            for f in [int(x) for x in a.factors.split(",")]:
                store = work / f"mem{f}"
                info = write_synthetic_store(store, a.prepared, last_m=a.mem_rows_m, repeat=f, width=a.mem_width)
                print(f"[bench] memory {f}x: {info['rows']} rows, {info['bytes_on_disk'] / 2**20:.0f} MiB, "
                      f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                d = run_child(["--child", "memory", "--store", str(store), "--buffer-rows", str(a.buffer_rows), *common],
                              a.threads)
                res["memory"].append({"factor": f, **info, **d})
                shutil.rmtree(store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    if "epochs" in res:
        e = res["epochs"]
        print(f"epoch time (median s): baseline {e['median_epoch_s']['baseline']:.2f}, distilled "
              f"{e['median_epoch_s']['distilled']:.2f}, ratio {e['ratio_distilled_over_baseline']:.3f} (goal < 1.3)")
    if "steps" in res:
        st = res["steps"]
        print(f"interleaved steps (median s): baseline {st['median_step_s']['baseline']:.3f}, distilled "
              f"{st['median_step_s']['distilled']:.3f}, ratio {st['ratio_distilled_over_baseline']:.3f} (goal < 1.3)")
    if "breakdown" in res:
        bd = res["breakdown"]
        for side, d in bd["median_s"].items():
            print(f"{side:9s} median s: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in d.items()))
        print(f"ratio {bd['ratio_distilled_over_baseline']:.3f}; one validation pass {bd['validation_pass_s']:.2f} s "
              f"({bd['steps_per_epoch']} steps an epoch)")
    if "variants" in res:
        v = res["variants"]
        print("before/after steps (median ms): " + ", ".join(f"{k} {x * 1000:.1f}" for k, x in v["median_step_s"].items())
              + f"; distilled/baseline {v['ratio_distilled_over_baseline']}; after/before {v['after_over_before']}; "
              f"losses bit-identical {v['losses_bit_identical']}")
    if "concurrent" in res:
        c = res["concurrent"]
        print("epochs (median s): " + ", ".join(f"{k} {x:.2f}" for k, x in c["median_epoch_s"].items())
              + "; CPU s per epoch: " + ", ".join(f"{k} {x:.2f}" for k, x in c["median_cpu_s_per_epoch"].items())
              + f"; over baseline {c['ratio_over_baseline']}; concurrent/sequential {c['concurrent_over_sequential']:.3f}; "
              f"distilled histories identical {c['distilled_histories_identical']}")
    if "fit" in res:
        f = res["fit"]
        print("fit epochs (median s): " + ", ".join(f"{k} {x:.2f}" for k, x in f["median_epoch_s"].items())
              + f"; distilled/baseline {f['ratio_distilled_over_baseline']}; after/before {f['after_over_before']}; "
              f"histories identical {f['histories_identical']}")
    if "stream" in res:
        print("teacher draws per epoch (median s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in res["stream"]["median_s_per_151_draws"].items()))
    for m in res.get("memory", []):
        print(f"store {m['factor']:>2}x: {m['rows']:>7} rows x {m['width']} fp16 = {m['h_dec_bytes'] / 2**20:7.0f} MiB h_dec; "
              f"peak RSS {m['peak_rss_mib']:.0f} MiB; one pass {m['seconds']:.1f}s ({m['steps']} steps)")
    print(f"threads {a.threads}; wrote {a.out}")


if __name__ == "__main__":
    main()
