"""teacher-dump's forward with attention in query chunks against one SDPA call per layer (issue 10; not kept).

With a padding mask the CPU flash-attention kernel computes every query against every key, the masked upper
triangle included. The candidate measured here (this script installs it; the pipeline does not have it) sends
the queries in chunks of C, each against the keys up to its own end and the matching slice of the causal mask,
written into the output in place. It was rejected on 2026-12-02: 255 of 943 rows of the default profile
differed (min cosine 0.999858) and the dump was no faster (BENCHMARKS.md, "attention in query chunks"). One process, one `HFTeacher` (the default: bf16 where the CPU runs it fast, fused
norm/MLP forwards, shared KV heads), the same rendered prompts (teacher-dump's, from the given candidates);
round by round, in alternating order, the chunk size is switched between 0 (the pipeline's one call) and each
value of --chunks, and the whole `HFTeacher.run` (padding, length-sorted batches of 16, forward,
identifier scores, copies to numpy) is timed. Every round's h_dec and scores are compared bit for bit with the
one-call round, and the rows that differ are counted (with the smallest cosine of h_dec and the largest score
difference).

    .venv/bin/python benchmarks/ab_query_chunks.py --samples 943 --rounds 2 \
        --json benchmarks/results/ab_query_chunks.json
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
    ap.add_argument("--samples", type=int, default=943)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunks", default="128", help="comma-separated chunk sizes, each against one call (0)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import numpy as np
    import torch

    from transformers import AttentionInterface

    from pipeline.teacher import hf_backend
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import GQA_SDPA, HFConfig, HFTeacher

    torch.set_num_threads(a.threads)
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, batch_size=a.batch_size))
    if teacher.model.config._attn_implementation != GQA_SDPA:
        sys.exit("the shared-KV-heads attention was not installed on this machine (see the log); nothing to compare")
    chunk = {"size": 0}

    def chunked(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        """The pipeline's _sdpa_gqa_forward, or its masked call in query chunks when the mask is causal."""
        width, c = query.shape[-2], chunk["size"]
        if (c <= 0 or attention_mask is None or attention_mask.dtype != torch.bool or width <= c
                or key.shape[-2] != width or query.requires_grad):
            return hf_backend._sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, is_causal=is_causal, **kwargs)
        bounds = [(i, min(width, i + c)) for i in range(0, width, c)]
        if any(bool(attention_mask[..., i0:i1, i1:].any()) for i0, i1 in bounds[:-1]):  # not causal
            return hf_backend._sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, is_causal=is_causal, **kwargs)
        out = query.new_empty((query.shape[0], width, query.shape[1], value.shape[-1]))
        view = out.transpose(1, 2)
        for i0, i1 in bounds:
            view[:, :, i0:i1] = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, i0:i1], key[:, :, :i1], value[:, :, :i1], attn_mask=attention_mask[..., i0:i1, :i1],
                dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True)
        return out, None

    AttentionInterface.register(GQA_SDPA, chunked)  # looked up by name at every layer call
    inputs = load_inputs(a.prepared, a.candidates, limit=a.samples)
    ident, ids = prompt_ids(inputs, teacher)
    variants = {"one call": 0, **{f"chunks of {c}": int(c) for c in a.chunks.split(",")}}

    def use(size: int) -> None:
        chunk["size"] = size

    use(0)
    teacher.run(ids[: a.batch_size], ident)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    outs: dict[str, object] = {}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            use(variants[name])
            t = time.perf_counter()
            out = teacher.run(ids, ident)
            times[name].append(time.perf_counter() - t)
            if name not in outs:
                outs[name] = out
            elif not (np.array_equal(outs[name].h_dec, out.h_dec) and np.array_equal(outs[name].scores, out.scores)):
                print(f"warning: {name} gave other bits in round {r} than in its first", flush=True)
        load.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{n}: {v[-1]:.1f} s" for n, v in times.items()), flush=True)
    ref = outs["one call"]
    compare = {}
    for name, out in outs.items():
        h0, h1 = ref.h_dec.astype(np.float64), out.h_dec.astype(np.float64)
        cos = (h0 * h1).sum(1) / np.linalg.norm(h0, axis=1) / np.linalg.norm(h1, axis=1)
        rows = ~((ref.h_dec == out.h_dec).all(1) & (ref.scores == out.scores).all(1))
        compare[name] = {"rows_differing": int(rows.sum()), "min_cosine": float(cos.min()),
                         "max_abs_score_diff": float(np.abs(ref.scores - out.scores).max()),
                         "rankings_identical": int((np.argsort(-ref.scores, 1, kind="stable")
                                                    == np.argsort(-out.scores, 1, kind="stable")).all(1).sum())}
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"command": "ab_query_chunks.py " + " ".join(sys.argv[1:]), "cpu": cpu_info()[0],
           "dtype": teacher.dtype_name, "samples": len(ids), "threads": a.threads,
           "rounds_s": times, "median_s": med,
           "median_ratio_over_one_call": {n: m / med["one call"] for n, m in med.items()},
           "samples_per_s": {n: len(ids) / m for n, m in med.items()}, "against_one_call": compare,
           "load_1min": load}
    print(json.dumps({k: res[k] for k in ("median_s", "median_ratio_over_one_call",
                                          "samples_per_s", "against_one_call", "load_1min")}, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
