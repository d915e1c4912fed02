"""teacher-tune's training step and held-out scoring, before and after a change, side by side in one process:
interleaved rounds, the order alternating, the same examples in both. `--compare`:
- `frozen-bf16` (the default): the frozen Linear weights stored in bf16 against float32 weights cast by autocast
  in every forward (what teacher-tune does). A candidate (issue 10), not adopted: see BENCHMARKS.md
  "teacher-tune: frozen weights stored in bf16".
- `shared-heads`: transformers' SDPA attention against `hf_backend.share_kv_heads(train=True)` (the frozen
  layers' attention reads the shared KV heads and stops at the diagonal, the trained layers' stops there too),
  which teacher-tune installs on a CPU since the twentieth session: BENCHMARKS.md "teacher-tune: the attention
  as in teacher-dump".

Both models are the embedded teacher loaded as `teacher-tune` loads it, wrapped by `apply_method` with the CPU
profile's settings (params.yaml teacher_tune: LoRA r16 on the 7 projections of the top 4 layers), trained by
`pipeline.teacher.tune.train` itself on teacher-dump's prompts (the default template, 20 candidates). Each round
trains both models on the same next chunk of examples (a fresh optimizer per round, the same in both) and
scores the same held-out chunk; at the end the trained adapters and all scores must be bit-identical. First
(frozen-bf16 only), on a model of its own, resident memory (anonymous and file-backed: from_pretrained maps the safetensors file) after
a forward as loaded, and after a forward with the frozen weights cast.

    .venv/bin/python benchmarks/ab_tune_frozen.py --rounds 5 --round-samples 16 \
        --json benchmarks/results/ab_tune_frozen.json
    .venv/bin/python benchmarks/ab_tune_frozen.py --compare shared-heads --rounds 5 --round-samples 16 \
        --json benchmarks/results/ab_tune_shared_heads_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_teacher import prompt_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--compare", choices=("frozen-bf16", "shared-heads"), default="frozen-bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-samples", type=int, default=16, help="training prompts per round (and as many scored)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--call-rounds", type=int, default=21,
                    help="shared-heads: interleaved timings of one frozen layer's attention call alone")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from types import SimpleNamespace

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.heap import TRAINING_KERNEL_CACHE_CAPACITY, bound_kernel_caches
    from pipeline.teacher.hf_backend import share_kv_heads
    from pipeline.teacher.tune import TuneConfig, TuneExample, apply_method, score_examples, train

    bound_kernel_caches(TRAINING_KERNEL_CACHE_CAPACITY)  # as run_tune does, before the first kernel
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    bf16 = torch.bfloat16
    source = resolve_teacher("embedded")
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = TuneConfig(method="lora", lora_r=a.lora_r, lora_alpha=2 * a.lora_r,
                     target_modules=tuple(a.target_modules.split(",")), top_layers=a.top_layers, lr=1e-3,
                     batch_size=a.batch_size, checkpoint_every=10**9, warmup_ratio=0.0)

    def frozen_linears(model) -> list:
        head = model.get_output_embeddings()  # stays float32: decision_logits runs it with autocast off
        return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]

    def cast(linears) -> None:  # the bits autocast would give these weights in every forward
        for m in linears:
            m.weight.data = m.weight.data.to(bf16)

    def load(change: bool):
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
        if change or a.compare != "shared-heads":  # as run_tune installs it (both sides of any other comparison)
            switched = share_kv_heads(model, bf16, train=True)
            if not switched and a.compare == "shared-heads":
                sys.exit("share_kv_heads switched no attention module on this machine: nothing to compare")
        linears = frozen_linears(model)  # before LoRA's own Linear layers exist
        torch.manual_seed(0)  # LoRA's initialisation, the same in both
        wrapped = apply_method(model, cfg)  # around the float32 weights (peft casts new adapters to the base dtype)
        if change and a.compare == "frozen-bf16":
            cast(linears)
        return wrapped

    def rss_mib() -> dict[str, int]:
        import gc

        gc.collect()
        lines = Path("/proc/self/status").read_text().splitlines()
        return {k: int(v.split()[0]) // 1024 for k, v in (ln.split(":") for ln in lines)
                if k in ("VmRSS", "RssAnon", "RssFile")}

    def one_forward(model) -> None:
        with torch.autocast("cpu", dtype=bf16, cache_enabled=False), torch.no_grad():
            model(torch.tensor([examples[0].input_ids]))

    n = a.rounds * a.round_samples
    shim = SimpleNamespace(tokenizer=tokenizer, context_length=8192)
    inputs = load_inputs(a.prepared, a.candidates, limit=2 * n + a.batch_size)
    ident, ids = prompt_ids(inputs, shim)
    rng = np.random.default_rng(0)
    examples = [TuneExample(p, int(rng.integers(len(ident)))) for p in ids]

    rss = {"before_load": rss_mib()}
    if a.compare == "frozen-bf16":
        # resident memory of one model (before the timed ones exist): as loaded, then with the frozen weights cast
        probe = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
        one_forward(probe)
        rss["float32_after_forward"] = rss_mib()
        cast(frozen_linears(probe))
        one_forward(probe)
        rss["frozen_bf16_after_forward"] = rss_mib()
        del probe
        print(f"resident MiB: {rss}", file=sys.stderr, flush=True)

    cand = a.compare.replace("-", "_")
    models = {"before": load(False), cand: load(True)}
    warm, train_ex, held = examples[: a.batch_size], examples[a.batch_size: a.batch_size + n], examples[a.batch_size + n:]
    call = attention_call(models[cand], train_ex[: a.batch_size], a.call_rounds) if a.compare == "shared-heads" else None

    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "score": []} for k in models}
    scores: dict[str, list[np.ndarray]] = {k: [] for k in models}
    with tempfile.TemporaryDirectory(prefix="ab_tune-") as tmp:
        for name, m in models.items():  # warm-up: one step and one scoring batch each
            train(m, warm, ident, pad_id, cfg, Path(tmp) / f"warm_{name}", "ab", compute_dtype=bf16)
            score_examples(m, warm, ident, pad_id, a.batch_size, compute_dtype=bf16)
        for r in range(a.rounds):
            chunk = slice(r * a.round_samples, (r + 1) * a.round_samples)
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                m = models[name]
                t = time.perf_counter()
                train(m, train_ex[chunk], ident, pad_id, cfg, Path(tmp) / f"{name}_{r}", "ab", compute_dtype=bf16)
                times[name]["train"].append(time.perf_counter() - t)
                t = time.perf_counter()
                scores[name].append(score_examples(m, held[chunk], ident, pad_id, a.batch_size, compute_dtype=bf16))
                times[name]["score"].append(time.perf_counter() - t)
            print(f"round {r}: " + ", ".join(f"{k} train {v['train'][-1]:.1f} s score {v['score'][-1]:.1f} s"
                                            for k, v in times.items()), file=sys.stderr, flush=True)

    trained = {k: {n_: p for n_, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    same_adapters = all(torch.equal(p, trained["before"][n_]) for n_, p in trained[cand].items())
    same_scores = all(np.array_equal(x, y) for x, y in zip(scores["before"], scores[cand]))
    ratio = {part: [f / b for f, b in zip(times[cand][part], times["before"][part])]
             for part in ("train", "score")}
    res = {
        "command": "ab_tune_frozen.py " + " ".join(sys.argv[1:]), "compare": a.compare,
        "cpu": cpu_info()[0], "threads": a.threads, "rounds": a.rounds, "round_samples": a.round_samples,
        "batch_size": a.batch_size, "top_layers": a.top_layers, "lora_r": a.lora_r,
        "mean_prompt_tokens": float(np.mean([len(e.input_ids) for e in train_ex])),
        "seconds": times,
        "median_seconds": {k: {p: statistics.median(v[p]) for p in v} for k, v in times.items()},
        "train_samples_per_s_median": {k: a.round_samples / statistics.median(v["train"]) for k, v in times.items()},
        f"ratio_{'frozen' if cand == 'frozen_bf16' else cand}_over_before": ratio,
        "median_ratio": {p: statistics.median(v) for p, v in ratio.items()},
        "bit_identical_adapters": same_adapters, "bit_identical_scores": same_scores,
        "resident_one_model_mib": rss, "attention_call": call,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    if not (same_adapters and same_scores and (call is None or (call["frozen"]["bit_identical"] and call["trained"]["bit_identical"]))):
        sys.exit(f"{a.compare} changed the bits: see the JSON")


def attention_call(model, batch, rounds: int) -> dict:
    """One layer's attention call as teacher-tune makes it (float32 q/k/v of a left-padded batch under bf16
    autocast), through transformers' SDPA function and through `_sdpa_gqa_forward`, interleaved: a frozen layer's
    (no gradient) and a trained layer's (q/k/v need gradients; forward and backward). Random values of the real
    shapes (the kernels' time does not depend on them); outputs and gradients must be equal."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.teacher.hf_backend import _grouped_attention, _sdpa_gqa_forward

    module = _grouped_attention(model)[0]
    width, n = max(len(e.input_ids) for e in batch), len(batch)
    heads, groups, dim = model.config.num_attention_heads, module.num_key_value_groups, module.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn((n, heads, width, dim), generator=g)
    k, v = (torch.randn((n, heads // groups, width, dim), generator=g) for _ in range(2))
    keep = torch.zeros((n, width), dtype=torch.bool)
    for row, e in enumerate(batch):
        keep[row, width - len(e.input_ids):] = True
    mask = torch.ones((width, width), dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    fns = {"transformers": sdpa_attention_forward, "shared_heads": _sdpa_gqa_forward}
    grad_out = torch.randn((n, width, heads, dim), generator=g).to(torch.bfloat16)
    res = {"batch": n, "width": width}
    for part in ("frozen", "trained"):
        ms: dict[str, list[float]] = {k_: [] for k_ in fns}
        outs = {}
        for r in range(rounds + 1):  # the first round warms both up, untimed
            for name in (fns if r % 2 == 0 else list(fns)[::-1]):
                leaves = [t.clone().requires_grad_(part == "trained") for t in (q, k, v)]
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                    out = fns[name](module, *leaves, mask, scaling=module.scaling)[0]
                if part == "trained":
                    out.backward(grad_out)
                if r:
                    ms[name].append(1000 * (time.perf_counter() - t))
                outs[name] = [out.detach()] + [x.grad for x in leaves if x.grad is not None]
        ratio = [b / a_ for a_, b in zip(ms["transformers"], ms["shared_heads"])]
        res[part] = {"ms": ms, "median_ms": {k_: statistics.median(v_) for k_, v_ in ms.items()},
                     "median_ratio": statistics.median(ratio), "rounds_faster": sum(x < 1 for x in ratio),
                     "bit_identical": len(outs["transformers"]) == len(outs["shared_heads"])
                     and all(torch.equal(x, y) for x, y in zip(outs["transformers"], outs["shared_heads"]))}
        print(f"attention call, {part} layer: {res[part]['median_ms']}, ratio {res[part]['median_ratio']:.3f}, "
              f"identical {res[part]['bit_identical']}", file=sys.stderr, flush=True)
    return res


if __name__ == "__main__":
    main()
