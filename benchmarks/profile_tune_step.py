"""Where teacher-tune's training step spends its time beyond the forward pass (issue 10).

benchmarks/bench_tune_step.py measured a step at 1.93x the forward alone on a Xeon, where the backward through
the top 4 of 30 layers counts about 0.14x the forward's FLOPs. This script splits a step, on the same model,
prompts and settings as that benchmark (teacher-tune's loader, LoRA r16 on 7 projections of the top 4 layers,
one bf16 autocast region per forward where `--dtype auto` picks bf16, batch 8), into:

- eval_fwd: `score_examples`' forward (eval mode, no_grad): what held-out scoring costs;
- train_fwd_nograd: the same forward in train mode under no_grad (LoRA dropout active, no graph);
- train_fwd: the training forward (train mode, autograd records the top layers), up to the loss;
- backward: `loss.backward()`;
- optimizer: `opt.step()` + `zero_grad`;

each batch's parts run back to back and the batches cycle `--rounds` times, so the parts see the same machine
state; medians per part. Then one step under torch.profiler: the top operators by self CPU time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_tune_step.py --samples 32 --rounds 3 \
        --json benchmarks/results/profile_tune_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_teacher import gemm_peak  # noqa: E402
from benchmarks.bench_tune_step import load_tune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--no-torch-profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.heap import TRAINING_KERNEL_CACHE_CAPACITY, bound_kernel_caches
    from pipeline.teacher.tune import TuneConfig, apply_method, compute_region, decision_logits, left_pad

    bound_kernel_caches(TRAINING_KERNEL_CACHE_CAPACITY)  # as teacher-tune (tune_run.run_tune)
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    choice, bf16, model, pad_id, ident, examples = load_tune_model(a.prepared, a.candidates, a.samples, a.dtype)
    cfg = TuneConfig(method="lora", lora_r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=a.lora_dropout,
                     target_modules=tuple(a.target_modules.split(",")), top_layers=a.top_layers, lr=1e-3,
                     batch_size=a.batch_size)
    wrapped = apply_method(model, cfg)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    dev = torch.device("cpu")
    batches = []
    for s in range(0, len(examples), a.batch_size):
        chunk = examples[s:s + a.batch_size]
        ids_t, mask, pos = left_pad([e.input_ids for e in chunk], pad_id, dev)
        batches.append((ids_t, mask, pos, torch.tensor([e.label for e in chunk])))
    parts: dict[str, list[float]] = {k: [] for k in ("eval_fwd", "train_fwd_nograd", "train_fwd", "backward",
                                                       "optimizer")}

    def step(ids_t, mask, pos, labels, record: bool) -> None:
        t0 = time.perf_counter()
        wrapped.eval()
        with torch.no_grad(), compute_region(dev, bf16):
            decision_logits(wrapped, ids_t, mask, pos, ident)
        t1 = time.perf_counter()
        wrapped.train()
        with torch.no_grad(), compute_region(dev, bf16):
            decision_logits(wrapped, ids_t, mask, pos, ident)
        t2 = time.perf_counter()
        with compute_region(dev, bf16):
            logits = decision_logits(wrapped, ids_t, mask, pos, ident)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if record:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[k].append(v)

    step(*batches[0], record=False)  # warm-up
    for _ in range(a.rounds):
        for b in batches:
            step(*b, record=True)
    per_batch = {k: statistics.median(v) for k, v in parts.items()}
    fwd = per_batch["eval_fwd"]
    train = per_batch["train_fwd"] + per_batch["backward"] + per_batch["optimizer"]
    peak = gemm_peak("bfloat16" if bf16 is not None else "float32", a.threads)
    res = {
        "command": "profile_tune_step.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_info()[0], "threads": a.threads, "dtype": choice.name, "samples": len(examples),
        "batch_size": a.batch_size, "rounds": a.rounds,
        "mean_prompt_tokens": float(np.mean([len(e.input_ids) for e in examples])),
        "gemm_peak_gflops": peak,
        "median_seconds_per_batch": per_batch,
        "train_step_over_eval_forward": train / fwd,
        "parts_over_eval_forward": {k: v / fwd for k, v in per_batch.items()},
        "load_avg_before": load_before,
    }
    if not a.no_torch_profile:
        from torch.profiler import ProfilerActivity, profile

        ids_t, mask, pos, labels = batches[-1]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wrapped.train()
            with compute_region(dev, bf16):
                logits = decision_logits(wrapped, ids_t, mask, pos, ident)
            torch.nn.functional.cross_entropy(logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(table)
        res["torch_profile_top"] = [
            {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:30]]
    res["load_avg_after"] = os.getloadavg()
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
