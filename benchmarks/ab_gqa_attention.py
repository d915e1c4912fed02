"""teacher-dump's forward with the KV heads shared inside SDPA against transformers' copied heads (issue 10).

With a padding mask, transformers' SDPA attention copies each of the embedded teacher's 3 KV heads 3 times
(`repeat_kv`) before calling the kernel, in every layer of every batch; `hf_backend._sdpa_gqa_forward` passes
them as they are with `enable_gqa=True` (CPU only). One process, one `HFTeacher` (the default: bf16 where the
CPU runs it fast, fused norm/MLP forwards), the same rendered prompts; round by round, in alternating order,
the model's attention implementation is switched between transformers' "sdpa" and the shared-heads one and
the whole `HFTeacher.run` (padding, length-sorted batches of 16, forward, identifier scores, copies to numpy)
is timed. Every round's h_dec and scores are compared bit for bit with the first round's.

    .venv/bin/python benchmarks/ab_gqa_attention.py --prepared /work/runs/scal/prepared \
        --candidates /work/runs/scal/candidates.parquet --samples 128 --rounds 5 \
        --json benchmarks/results/ab_gqa_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_teacher import prompt_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", choices=("gqa", "causal"), default="gqa",
                    help="gqa: copied against shared KV heads; causal: the kernel over the whole square against "
                         "stopped at the diagonal (both with shared heads)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import numpy as np
    import torch

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import CAUSAL_STOP, GQA_SDPA, HFConfig, HFTeacher

    torch.set_num_threads(a.threads)
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, batch_size=a.batch_size))
    if teacher.fused.get("gqa_attention", 0) == 0:
        sys.exit("the shared-KV-heads attention was not installed on this machine (see the log); nothing to compare")
    inputs = load_inputs(a.prepared, a.candidates, limit=a.samples)
    ident, ids = prompt_ids(inputs, teacher)
    if a.compare == "gqa":
        variants = {"copied KV heads (transformers' sdpa)": "sdpa", "shared KV heads (default)": GQA_SDPA}
        old_name, new_name = list(variants)

        def switch(name: str) -> None:
            teacher.model.set_attn_implementation(variants[name])
    else:
        if teacher.fused.get("causal_stop", 0) == 0:
            sys.exit("the attention kernel's stop at the diagonal was not installed on this machine; nothing to compare")
        variants = {"full square (mask only)": False, "stops at the diagonal (default)": True}
        old_name, new_name = list(variants)

        def switch(name: str) -> None:
            CAUSAL_STOP["on"] = variants[name]
    teacher.run(ids[: a.batch_size], ident)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    ref = None
    identical = True
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            switch(name)
            t = time.perf_counter()
            out = teacher.run(ids, ident)
            times[name].append(time.perf_counter() - t)
            if ref is None:
                ref = out
            identical &= bool(np.array_equal(ref.h_dec, out.h_dec) and np.array_equal(ref.scores, out.scores))
        load.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{n}: {v[-1]:.1f} s" for n, v in times.items()), flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    old, new = med[old_name], med[new_name]
    per_round = [n / o for o, n in zip(*times.values())]
    res = {"command": "ab_gqa_attention.py " + " ".join(sys.argv[1:]), "cpu": cpu_info()[0], "compare": a.compare,
           "dtype": teacher.dtype_name, "samples": len(ids), "threads": a.threads, "rounds_s": times,
           "median_s": med, "median_ratio_new_over_old": new / old, "per_round_ratio": per_round,
           "samples_per_s": {n: len(ids) / m for n, m in med.items()},
           "bit_identical_h_dec_and_scores": identical, "load_1min": load}
    print(json.dumps({k: res[k] for k in ("median_s", "median_ratio_new_over_old", "per_round_ratio",
                                          "samples_per_s", "bit_identical_h_dec_and_scores", "load_1min")},
                     indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
