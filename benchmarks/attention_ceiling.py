"""How close to the bf16 GEMM peak the teacher's prefill can get with its numerics as they are (issue 10).

One length-sorted batch of teacher-dump's prompts (the default template and batch size) goes through the real
embedded teacher as teacher-dump runs it (`HFTeacher`, `--dtype auto`, fused norm/MLP forwards). The arguments
of its first attention call (query, key, value, the padding mask, exactly as transformers passes them to
`scaled_dot_product_attention`) and the inputs of its seven Linear layers are captured; then, interleaved round
by round in this one process, are timed:
- the whole forward of that batch (`HFTeacher._batch`, what teacher-dump runs per batch);
- the seven Linear layers' GEMMs alone, on their captured inputs (x the number of layers);
- the attention kernel alone, on the captured arguments (x the number of layers): over the whole square as SDPA
  runs it with a mask, and stopped at the diagonal as the default runs it (the same mask, `is_causal` told the
  kernel; hf_backend._sdpa_gqa_forward, same bits); and the same query, key and value through the causal-only
  path (`is_causal=True`, no mask; its numbers differ, see BENCHMARKS.md "right padding with a causal-only
  mask");
- an n x n x n bf16 GEMM (the peak, as bench_teacher.py measures it).

Useful FLOPs (the issue's count): 2 x non-embedding parameters x real prompt tokens + causal attention
2 x layers x T^2 x hidden per row. The ceiling is the fraction of the peak the forward would reach if
everything except the GEMMs and the attention kernel (norms, RoPE, SiLU and products, casts, the head) took no
time at all: an upper bound for any change that keeps the attention kernel, and so the numbers, as they are.

    .venv/bin/python benchmarks/attention_ceiling.py --prepared data/prepared \
        --candidates data/candidates/candidates.parquet --json benchmarks/results/attention_ceiling.json
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

from benchmarks.bench_teacher import gemm_peak, prompt_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--prompts", type=int, default=256, help="prompts rendered; the batch is the median-length one")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=str, default="2", help="comma-separated thread counts, each measured in turn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher import hf_backend
    from pipeline.teacher.hf_backend import CAUSAL_STOP, HFConfig, HFTeacher

    load_before = os.getloadavg()
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, dtype=a.dtype, batch_size=a.batch_size))
    inputs = load_inputs(a.prepared, a.candidates, limit=a.prompts)
    ident, ids = prompt_ids(inputs, teacher)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    mid = max(0, len(order) // 2 - a.batch_size // 2)
    batch = [ids[i] for i in order[mid: mid + a.batch_size]]
    lengths = [len(p) for p in batch]

    cfg = teacher.model.config
    layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    layer0 = teacher.base.layers[0]
    linears = [(n, m) for n, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)]
    captured: dict[str, object] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.setdefault(n, args[0].detach().clone()))
             for n, m in linears]
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        captured.setdefault("sdpa", ([t.detach().clone() if torch.is_tensor(t) else t for t in args],
                                     {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kw.items()}))
        return real_sdpa(*args, **kw)

    F.scaled_dot_product_attention = spy
    stop = bool(teacher.fused.get("causal_stop"))  # the default: the kernel stops at the diagonal
    CAUSAL_STOP["on"] = False  # for the capture, so that the call goes through SDPA with its boolean mask
    try:
        with torch.inference_mode():
            teacher._batch(batch, ident, "first-token", 0)
    finally:
        F.scaled_dot_product_attention = real_sdpa
        CAUSAL_STOP["on"] = stop
        for h in hooks:
            h.remove()
    sd_args, sd_kw = captured["sdpa"]
    q, k, v = sd_args[:3]
    mask = sd_kw.get("attn_mask", sd_args[3] if len(sd_args) > 3 else None)
    sdpa_desc = {"query": list(q.shape), "key": list(k.shape), "dtype": str(q.dtype),
                 "mask": None if mask is None else {"shape": list(mask.shape), "dtype": str(mask.dtype)},
                 "kwargs": {kk: vv for kk, vv in sd_kw.items() if not torch.is_tensor(vv)}}

    emb = teacher.model.get_input_embeddings().weight.numel()
    p_nonemb = sum(p.numel() for p in teacher.model.parameters()) - emb
    useful = sum(2 * p_nonemb * t + 2 * layers * t * t * hidden for t in lengths)
    attn_useful = sum(2 * t * t * hidden for t in lengths)  # one layer
    rows, width = len(batch), max(lengths)
    lin_flops = sum(2 * rows * width * m.in_features * m.out_features for _, m in linears)  # one layer, pads too

    results = []
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        t = {"forward": [], "linears": [], "attention_masked": [], "attention_stopped": [], "attention_causal_only": []}

        def timed(key, fn):
            s = time.perf_counter()
            fn()
            t[key].append(time.perf_counter() - s)

        with torch.inference_mode():
            def lin():
                for n, m in linears:
                    F.linear(captured[n], m.weight, m.bias)

            def att():
                real_sdpa(*sd_args, **sd_kw)

            causal_kw = {kk: vv for kk, vv in sd_kw.items() if kk not in ("attn_mask", "is_causal")}

            def att_causal():
                real_sdpa(q, k, v, is_causal=True, **causal_kw)

            # the kernel as the default runs it: the same mask, told it is causal (hf_backend._sdpa_gqa_forward)
            additive = hf_backend._causal_additive(mask, q)

            def att_stopped():
                hf_backend._FLASH_CPU(q, k, v, 0.0, True, attn_mask=additive, scale=sd_kw.get("scale"))

            teacher._batch(batch, ident, "first-token", 0), lin(), att(), att_stopped(), att_causal()  # warm-up
            for r in range(a.rounds):
                steps = [("forward", lambda: teacher._batch(batch, ident, "first-token", 0)), ("linears", lin),
                         ("attention_masked", att), ("attention_stopped", att_stopped),
                         ("attention_causal_only", att_causal)]
                for key, fn in (steps if r % 2 == 0 else steps[::-1]):
                    timed(key, fn)
        peak = gemm_peak(str(teacher.dtype).removeprefix("torch."), threads)
        med = {kk: statistics.median(vv) for kk, vv in t.items()}
        in_use = "attention_stopped" if stop else "attention_masked"  # the kernel call the forward makes
        lin_s, att_s = layers * med["linears"], layers * med[in_use]
        results.append({
            "threads": threads, "gemm_peak_gflops": peak, "seconds": t, "median_seconds": med,
            "linears_gflops_model_shapes": lin_flops / med["linears"] / 1e9,
            "attention_masked_useful_gflops": attn_useful / med["attention_masked"] / 1e9,
            "attention_stopped_useful_gflops": attn_useful / med["attention_stopped"] / 1e9,
            "attention_in_forward": in_use,
            "attention_causal_only_useful_gflops": attn_useful / med["attention_causal_only"] / 1e9,
            "share_of_forward": {"linears": lin_s / med["forward"], "attention": att_s / med["forward"],
                                 "everything_else": 1 - (lin_s + att_s) / med["forward"]},
            "fraction_of_peak": {
                "forward_now": useful / med["forward"] / 1e9 / peak,
                "ceiling_nothing_but_gemms_and_attention_in_use": useful / (lin_s + att_s) / 1e9 / peak,
                "ceiling_with_full_square_attention": useful / (lin_s + layers * med["attention_masked"]) / 1e9 / peak,
                "ceiling_with_causal_only_attention": useful / (lin_s + layers * med["attention_causal_only"]) / 1e9
                / peak,
                "ceiling_gemms_only": useful / lin_s / 1e9 / peak,
            },
        })
        print(json.dumps(results[-1]["fraction_of_peak"]), file=sys.stderr, flush=True)

    res = {"command": "attention_ceiling.py " + " ".join(sys.argv[1:]), "cpu": cpu_info()[0],
           "dtype": teacher.dtype_name, "fused": teacher.fused, "batch_rows": rows, "batch_width": width,
           "prompt_tokens": lengths, "layers": layers, "hidden": hidden, "non_embedding_params": int(p_nonemb),
           "sdpa_call": sdpa_desc, "linears": [(n, m.in_features, m.out_features) for n, m in linears],
           "results": results, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
