"""Teacher-dump throughput: samples/s and prompt tokens/s per mode, batch size and dtype, with peak
memory and the fraction of this machine's measured GEMM peak that the prefill reaches.

    python benchmarks/bench_teacher.py --threads 2 --prompts 32 [--candidates data/candidates/candidates.parquet]

Each configuration runs in its own subprocess so its peak RSS is its own. Prompts come from the real
prepared data (data/prepared) and, when no candidates file is given, 20 random unseen candidates per
user (the same prompt shape as the retriever's; the teacher does not care where candidates came from).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_time(fn, reps: int = 5, min_seconds: float = 2.0) -> float:
    """Best time of `fn()` over at least `reps` calls and `min_seconds` of calls, after one warm-up call.

    Time-bounded, not 5 calls: on the 2-vCPU KVM guests the first ~10 calls at 2 threads ran at 0.65-0.75x
    the steady rate, and whole stretches of calls at about the 1-thread rate (another tenant on the second
    vCPU's core); five 2048^3 matmuls then reported 208-211 GFLOP/s where 2 s of calls reached 390-409 (Zen 4,
    2026-12-03). An underestimated peak inflates every fraction of it."""
    fn()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def gemm_peak(dtype_name: str, threads: int, n: int = 2048, reps: int = 5, min_seconds: float = 2.0) -> float:
    """Best GFLOP/s of an n x n x n matmul (best_time: at least `reps` calls and `min_seconds` of calls)."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, reps, min_seconds) / 1e9


def synth_candidates(prepared: Path, out: Path, k: int = 20, seed: int = 0) -> Path:
    from pipeline.data.candidates import write_candidates
    from pipeline.data.prepared import load_prepared

    data = load_prepared(prepared)
    rng = np.random.default_rng(seed)
    users, pos, tgt, cands = [], [], [], []
    for u, t in enumerate(data.train):
        p = len(t) - 1
        seen = set(t[:p].tolist())
        pool = np.array([i for i in range(1, data.n_items + 1) if i not in seen])
        users.append(u), pos.append(p), tgt.append(t[p]), cands.append(rng.choice(pool, k, replace=False))
    write_candidates(out, np.array(users), np.array(pos), np.array(tgt), np.array(cands),
                     np.zeros((len(users), k), np.float32),
                     {"prepared_fingerprint": data.fingerprint, "selection": "last 1 per user (random candidates)"})
    return out


def prompt_ids(inputs, teacher) -> tuple[list[int], list[list[int]]]:
    """The identifier token ids and teacher-dump's rendered prompt ids (its default settings) for `inputs`."""
    from pipeline.teacher.dump import DumpConfig, _render
    from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
    from pipeline.teacher.prompt import load_template

    scheme = make_scheme("letters", inputs.k)
    open_id = teacher.tokenizer.encode("[", add_special_tokens=False)[0]
    prompts, _ = _render(inputs.samples, inputs, DumpConfig(), teacher.tokenizer, load_template(), scheme,
                         teacher.context_length, open_id)
    return identifier_token_ids(scheme, teacher.tokenizer), [p.input_ids for p in prompts]


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process: render prompts, warm up, time the backend."""
    import torch

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    torch.set_num_threads(args.threads)
    inputs = load_inputs(args.prepared, args.candidates, limit=args.prompts)
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, dtype=args.dtype, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens))
    ident, ids = prompt_ids(inputs, teacher)
    teacher.run(ids[: args.batch_size], ident, args.mode)  # warm-up
    t = time.perf_counter()
    teacher.run(ids, ident, args.mode)
    secs = time.perf_counter() - t
    tokens = sum(len(i) for i in ids)
    return {"mode": args.mode, "dtype": teacher.dtype_name, "batch_size": args.batch_size, "threads": args.threads,
            "prompts": len(ids), "mean_prompt_tokens": tokens / len(ids), "seconds": secs,
            "samples_per_s": len(ids) / secs, "prompt_tok_per_s": tokens / secs,
            "non_embedding_params": teacher.n_params(non_embedding=True),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


VARIANTS = {
    # name: (HFConfig overrides, batch size, right padding)
    "before": ({"fused_ops": False}, 16, False),  # HF's own forwards at teacher-dump's default batch
    "fused": ({"fused_ops": True}, 16, False),
    "fused_b8": ({"fused_ops": True}, 8, False),
    "fused_b32": ({"fused_ops": True}, 32, False),
    "eager_attn": ({"attn_implementation": "eager", "fused_ops": False}, 16, False),
    "right_pad_causal": ({"fused_ops": True}, 16, True),
    "compiled": ({}, 16, False),  # the default backend with torch.compile(base, dynamic=True): COMPILED below
}
COMPILED = {"compiled"}  # variants whose base model runs through torch.compile (compile time in "warmup_s")


def run_variants(args: argparse.Namespace) -> dict:
    """Variants of the first-token forward on the same prompts in one process, interleaved round by round
    (load hits all alike): median seconds per round, and each variant's h_dec and ranking against 'before'."""
    import statistics

    import torch

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    loc = resolve_teacher("embedded").location
    teachers = {}
    for n in names:
        over, bs, _ = VARIANTS[n]
        key = tuple(sorted(over.items()))
        teachers[n] = next((t for m, t in teachers.items()
                            if tuple(sorted(VARIANTS[m][0].items())) == key and (m in COMPILED) == (n in COMPILED)),
                           None) or HFTeacher(HFConfig(loc, dtype=args.dtype, batch_size=bs, **over))
        if n in COMPILED:
            teachers[n].base = torch.compile(teachers[n].base, dynamic=True)
    t0 = teachers[names[0]]
    inputs = load_inputs(args.prepared, args.candidates, limit=args.prompts)
    ident, ids = prompt_ids(inputs, t0)

    def right_pad_run(t: HFTeacher, bs: int):
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        h = np.zeros((len(ids), t.hidden_size), np.float32)
        sc = np.zeros((len(ids), len(ident)), np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                lens = torch.tensor([len(ids[i]) for i in idx])
                x = torch.full((len(idx), int(lens.max())), t.pad_id, dtype=torch.long)
                for b, i in enumerate(idx):
                    x[b, :len(ids[i])] = torch.tensor(ids[i])
                last = t.base(input_ids=x, use_cache=False).last_hidden_state[torch.arange(len(idx)), lens - 1]
                h[idx], sc[idx] = last.float().numpy(), t._ident_scores(last, ident).numpy()
        return h, sc

    def run(n: str):
        over, bs, right = VARIANTS[n]
        t = teachers[n]
        if right:
            return right_pad_run(t, bs)
        object.__setattr__(t.cfg, "batch_size", bs)
        o = t.run(ids, ident, "first-token")
        return o.h_dec, o.scores

    outs, warmup_s = {}, {}
    for n in names:  # warm-up (a compiled variant compiles here), and the outputs compared
        t = time.perf_counter()
        outs[n] = run(n)
        warmup_s[n] = time.perf_counter() - t
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for _ in range(args.rounds):
        for n in names:
            t = time.perf_counter()
            run(n)
            times[n].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    ref_h, ref_s = outs["before"] if "before" in outs else outs[names[0]]
    res = {}
    for n in names:
        h, sc = outs[n]
        cos = (h * ref_h).sum(1) / np.linalg.norm(h, axis=1) / np.linalg.norm(ref_h, axis=1)
        same_rank = [np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable")) for a, b in zip(sc, ref_s)]
        med = statistics.median(times[n])
        res[n] = {"round_s": times[n], "median_round_s": med, "samples_per_s": len(ids) / med,
                  "min_cosine_vs_before": float(cos.min()), "rankings_identical": int(sum(same_rank)),
                  "max_abs_score_diff": float(np.abs(sc - ref_s).max()), "batch_size": VARIANTS[n][1],
                  "fused": dict(teachers[n].fused), "compiled": n in COMPILED, "warmup_s": warmup_s[n]}
    return {"threads": args.threads, "prompts": len(ids), "dtype": t0.dtype_name, "rounds": args.rounds,
            "mean_prompt_tokens": sum(len(i) for i in ids) / len(ids), "load_avg_per_round": loads, "variants": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--configs", default="first-token:bfloat16:1,first-token:bfloat16:8,first-token:bfloat16:16,"
                                         "first-token:float32:8,generate:bfloat16:8")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ap.add_argument("--variants", default=None,
                    help=f"compare first-token variants side by side in one process instead: {','.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3, help="--variants: interleaved rounds")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="first-token", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    tmp = Path(tempfile.mkdtemp())
    cands = args.candidates or synth_candidates(args.prepared, tmp / "candidates.parquet")
    if args.variants:
        args.candidates = cands
        load0 = os.getloadavg()
        r = run_variants(args)
        r.update(command="python benchmarks/bench_teacher.py " + " ".join(sys.argv[1:]), load_avg_before=load0,
                 load_avg_after=os.getloadavg())
        for n, v in r["variants"].items():
            print(f"{n:18s} batch {v['batch_size']:2d}: median {v['median_round_s']:.2f} s per {r['prompts']} prompts "
                  f"({v['samples_per_s']:.2f} samples/s), min cosine vs before {v['min_cosine_vs_before']:.7f}, "
                  f"rankings identical {v['rankings_identical']}/{r['prompts']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(r, indent=1))
        return
    load = os.getloadavg()
    peaks = {d: gemm_peak(d, args.threads) for d in ("bfloat16", "float32")}
    print(f"threads {args.threads}, load average {load[0]:.2f}; GEMM peak: "
          + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peaks.items()), flush=True)
    results = []
    for spec in args.configs.split(","):
        mode, dtype, bs = spec.split(":")
        n = args.gen_prompts if mode == "generate" else args.prompts
        cmd = [sys.executable, __file__, "--one", "--prepared", str(args.prepared), "--candidates", str(cands),
               "--threads", str(args.threads), "--prompts", str(n), "--mode", mode, "--dtype", dtype,
               "--batch-size", bs, "--max-new-tokens", str(args.max_new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if mode == "first-token":  # prefill FLOPs: 2 x non-embedding params x tokens (attention ignored)
            r["gemm_fraction"] = 2 * r["non_embedding_params"] * r["prompt_tok_per_s"] / (peaks[r["dtype"]] * 1e9)
        results.append(r)
        print(f"{mode:11s} {r['dtype']:8s} batch {r['batch_size']:2d}: {r['samples_per_s']:.2f} samples/s, "
              f"{r['prompt_tok_per_s']:.0f} prompt tok/s ({r['mean_prompt_tokens']:.0f} tok/prompt), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB"
              + (f", {r['gemm_fraction']:.0%} of {r['dtype']} GEMM peak" if "gemm_fraction" in r else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "load_avg_1m": load[0], "gemm_gflops": peaks,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
