"""Where teacher-dump's time goes, per phase, with the fraction of this machine's bf16 GEMM peak it reaches.

    .venv/bin/python benchmarks/profile_teacher.py --samples 64 --threads 1,2 \
        --json benchmarks/results/perf_profile_teacher.json

One child process per thread count (OMP_NUM_THREADS and torch threads set before torch loads). Each
child runs teacher-dump's own pieces on the first `--samples` teacher samples of the prepared
MovieLens-100K (last training position per user; 20 random unseen candidates unless `--candidates`
is given: the teacher does not care where candidates came from) with the embedded teacher, in the
dtype `--dtype auto` chooses, and times:

- render: `pipeline.teacher.dump._render` (chat template + tokenisation, history cut to fit);
- pad: `HFTeacher._pad` of every batch (length-sorted batches of `--batch-size`, as `HFTeacher.run`);
- forward, split by module type with forward hooks: embedding, attention projections (q/k/v/o),
  attention core (the rest of self_attn: RoPE, SDPA, reshapes), MLP, RMSNorms, and what is left
  (mask construction, rotary tables, the decoder loop);
- head: last-position slice, the K identifier logits, the copy to numpy;
- arrow: `pipeline.teacher.dump._table`; write: `StoreWriter.write_shard` (zstd Parquet, fsync, rename).

Peaks measured in the same child, right before the profile: a 2048^3 bf16 matmul, and the model's
own linear shapes (q,k,v,o,gate,up,down of one layer on a [batch x mean prompt] token matrix, bf16
F.linear). FLOPs counted: 2 x non-embedding parameters x prompt tokens, plus causal attention
(QK^T and AV over the real tokens: 2 x hidden x L(L+1) per layer per prompt). Padded tokens are
not counted as useful work. Also the pad waste of the batching over all samples of the store
(sorted within each shard of `--shard-rows`, as teacher-dump does, against unsorted batches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
MARK = "PROFILE_JSON "

from bench_teacher import best_time  # noqa: E402  (time-bounded: see its docstring)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def gemm_peaks(dtype, tokens: int, hidden: int, inner: int, q_out: int, kv_out: int, reps: int = 5) -> dict:
    """GFLOP/s of a 2048^3 matmul and of one decoder layer's linear shapes on `tokens` rows."""
    import torch
    import torch.nn.functional as F

    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    square = 2 * n**3 / best_time(lambda: a @ b, reps) / 1e9
    x = torch.randn(tokens, hidden, dtype=dtype)
    xi = torch.randn(tokens, inner, dtype=dtype)
    ws = [torch.randn(o, hidden, dtype=dtype) for o in (q_out, kv_out, kv_out, hidden, inner, inner)]
    wd = torch.randn(hidden, inner, dtype=dtype)

    def layer():
        for w in ws:
            F.linear(x, w)
        F.linear(xi, wd)

    flops = 2 * tokens * (sum(w.shape[0] * w.shape[1] for w in ws) + wd.numel())
    shapes = flops / best_time(layer, reps) / 1e9
    return {"square_2048_gflops": square, "model_shapes_gflops": shapes, "model_shapes_tokens": tokens}


def pad_waste(lengths: list[int], batch: int, shard_rows: int, sort: bool) -> float:
    padded = real = 0
    for s in range(0, len(lengths), shard_rows):
        shard = lengths[s:s + shard_rows]
        if sort:
            shard = sorted(shard)
        for b in range(0, len(shard), batch):
            chunk = shard[b:b + batch]
            padded += max(chunk) * len(chunk)
            real += sum(chunk)
    return 1 - real / padded


class LayerTimer:
    """Inclusive wall time per module type via forward pre/post hooks (CPU ops are synchronous)."""

    KINDS = {"q_proj": "attn_proj", "k_proj": "attn_proj", "v_proj": "attn_proj", "o_proj": "attn_proj",
             "self_attn": "attn_total", "mlp": "mlp", "input_layernorm": "norm", "post_attention_layernorm": "norm",
             "norm": "norm", "embed_tokens": "embed"}

    def __init__(self, base) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.handles = []
        for name, mod in base.named_modules():
            kind = self.KINDS.get(name.rsplit(".", 1)[-1])
            if kind:
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post(kind)))

    def _pre(self, mod, args):
        mod._t0 = time.perf_counter()

    def _post(self, kind):
        def hook(mod, args, out):
            self.sums[kind] += time.perf_counter() - mod._t0
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def child(args: argparse.Namespace) -> dict:
    import torch

    from pipeline.store import StoreSpec, StoreWriter
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import DumpConfig, _render, _table, load_inputs, store_settings
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher, TeacherOutput
    from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
    from pipeline.teacher.prompt import DECISION_SUFFIX, load_template

    torch.set_num_threads(args.threads)
    load_before = load_avg()
    source = resolve_teacher("embedded")
    teacher = HFTeacher(HFConfig(source.location, dtype=args.dtype, batch_size=args.batch_size,
                                 attn_implementation=args.attn, fused_ops=args.fused != "0"))
    cfg = DumpConfig(shard_rows=args.samples)
    all_inputs = load_inputs(args.prepared, args.candidates)
    inputs = load_inputs(args.prepared, args.candidates, limit=args.samples)
    scheme = make_scheme("letters", inputs.k)
    ident = identifier_token_ids(scheme, teacher.tokenizer)
    open_id = teacher.tokenizer.encode(DECISION_SUFFIX, add_special_tokens=False)[0]
    template = load_template()
    max_prompt = teacher.context_length

    # warm-up (one batch), outside every timing
    warm, _ = _render(inputs.samples.head(args.batch_size), inputs, cfg, teacher.tokenizer, template, scheme,
                      max_prompt, open_id)
    teacher.run([p.input_ids for p in warm], ident, "first-token")

    out: dict = {"threads": args.threads, "dtype": teacher.dtype_name, "dtype_reason": teacher.dtype_choice.reason,
                 "batch_size": args.batch_size, "samples": inputs.samples.height,
                 "attn_implementation": teacher.model.config._attn_implementation, "fused": teacher.fused}
    t = time.perf_counter()
    prompts, shown = _render(inputs.samples, inputs, cfg, teacher.tokenizer, template, scheme, max_prompt, open_id)
    phases = {"render": time.perf_counter() - t}
    ids = [p.input_ids for p in prompts]
    lengths = [len(i) for i in ids]
    mean_len = statistics.mean(lengths)
    text = teacher.model.config
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    head_dim = int(getattr(text, "head_dim", hidden // text.num_attention_heads))
    out["gemm"] = gemm_peaks(teacher.dtype, int(args.batch_size * mean_len), hidden, int(text.intermediate_size),
                             int(text.num_attention_heads) * head_dim, int(text.num_key_value_heads) * head_dim)

    timer = LayerTimer(teacher.base)
    order = sorted(range(len(ids)), key=lambda i: (lengths[i], i))
    h_out = np.zeros((len(ids), teacher.hidden_size), np.float32)
    s_out = np.zeros((len(ids), len(ident)), np.float32)
    pad = fwd = head = 0.0
    padded_tokens = 0
    with torch.inference_mode():
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            t0 = time.perf_counter()
            x, mask, pos = teacher._pad([ids[i] for i in idx])
            t1 = time.perf_counter()
            o = teacher.base(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False)
            t2 = time.perf_counter()
            h = o.last_hidden_state[:, -1, :]
            sc = teacher._ident_scores(h, ident)
            h_out[idx], s_out[idx] = h.float().cpu().numpy(), sc.cpu().numpy()
            t3 = time.perf_counter()
            pad, fwd, head = pad + t1 - t0, fwd + t2 - t1, head + t3 - t2
            padded_tokens += x.numel()
    timer.remove()
    phases.update(pad=pad, forward=fwd, head=head)
    layer = dict(timer.sums)
    layer["attn_core"] = layer.pop("attn_total", 0.0) - layer.get("attn_proj", 0.0)
    layer["other"] = fwd - sum(layer.values())
    t = time.perf_counter()
    table, _ = _table(inputs.samples, prompts, shown, TeacherOutput(h_out, s_out, None), scheme, cfg, ident)
    phases["arrow"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        teacher_meta = {"name": source.name, "revision": source.revision, "hidden_size": teacher.hidden_size,
                        "dtype": teacher.dtype_name}
        spec = StoreSpec(store_settings(cfg, inputs, teacher_meta, template, scheme, max_prompt, None),
                         inputs.samples.height, cfg.shard_rows, teacher.hidden_size, cfg.h_dec_dtype)
        writer = StoreWriter(Path(tmp) / "store", spec)
        t = time.perf_counter()
        writer.write_shard(0, table)
        writer.write_manifest()
        phases["write"] = time.perf_counter() - t
    total = sum(phases.values())
    tokens = sum(lengths)
    n_params = teacher.n_params(non_embedding=True)
    attn_flops = sum(2 * hidden * L * (L + 1) * layers for L in lengths)
    flops = 2 * n_params * tokens + attn_flops
    peak = out["gemm"]["model_shapes_gflops"]
    out.update({
        "phases_s": phases, "forward_by_layer_type_s": layer, "total_s": total,
        "prompt_tokens": tokens, "mean_prompt_tokens": mean_len, "padded_tokens": padded_tokens,
        "pad_waste_this_run": 1 - tokens / padded_tokens,
        "non_embedding_params": n_params, "flops": flops, "attention_flops": attn_flops,
        "samples_per_s_end_to_end": len(ids) / total, "prompt_tok_per_s_end_to_end": tokens / total,
        "achieved_gflops_forward": flops / fwd / 1e9, "achieved_gflops_end_to_end": flops / total / 1e9,
        "fraction_of_model_shape_peak_forward": flops / fwd / 1e9 / peak,
        "fraction_of_model_shape_peak_end_to_end": flops / total / 1e9 / peak,
        "fraction_of_square_peak_end_to_end": flops / total / 1e9 / out["gemm"]["square_2048_gflops"],
        "load_avg_before": load_before, "load_avg_after": load_avg(),
    })
    if args.pad_waste:  # over the whole store, token counts only
        all_prompts, _ = _render(all_inputs.samples, all_inputs, cfg, teacher.tokenizer, template, scheme,
                                 max_prompt, open_id)
        all_len = [len(p.input_ids) for p in all_prompts]
        out["pad_waste_store"] = {
            "samples": len(all_len), "mean_prompt_tokens": statistics.mean(all_len),
            "min_max_tokens": [min(all_len), max(all_len)],
            **{f"batch{b}_shard{args.shard_rows}_{'sorted' if srt else 'unsorted'}": pad_waste(all_len, b, args.shard_rows, srt)
               for b in (8, 16, 32) for srt in (True, False)},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, one child each")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attn", default=None, help="attn_implementation passed to from_pretrained (default: HF's)")
    ap.add_argument("--runs", default=None,
                    help="children as THREADS:FUSED pairs, e.g. 1:0,1:1,2:1 (FUSED 1 = HFConfig(fused_ops=True), "
                         "0 = HF's own norm/MLP forwards, the default); default: --threads with FUSED 0")
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pad-waste", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fused", default="0", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        print(MARK + json.dumps(child(args)), flush=True)
        return
    from bench_teacher import synth_candidates

    tmp = Path(tempfile.mkdtemp())
    cands = args.candidates or synth_candidates(args.prepared, tmp / "candidates.parquet")
    runs = []
    pairs = [tuple(int(v) for v in r.split(":")) for r in args.runs.split(",")] if args.runs else \
        [(int(x), 0) for x in args.threads.split(",")]
    for i, (th, fused) in enumerate(pairs):
        cmd = [sys.executable, __file__, "--child", "--prepared", str(args.prepared), "--candidates", str(cands),
               "--samples", str(args.samples), "--threads", str(th), "--batch-size", str(args.batch_size),
               "--dtype", args.dtype, "--shard-rows", str(args.shard_rows), "--fused", str(fused)]
        cmd += ["--attn", args.attn] if args.attn else []
        cmd += ["--pad-waste"] if i == 0 else []
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(th), "GEDISTILL_NO_PROGRESS": "1"})
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        r = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith(MARK))[len(MARK):])
        runs.append(r)
        ph = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
        ly = ", ".join(f"{k} {v:.2f}" for k, v in r["forward_by_layer_type_s"].items())
        print(f"threads {th}, fused {r['fused']} ({r['dtype']}, {r['attn_implementation']}, load {r['load_avg_before']}): "
              f"{r['samples_per_s_end_to_end']:.2f} samples/s; phases s: {ph}; forward by type s: {ly}; "
              f"GEMM peak square {r['gemm']['square_2048_gflops']:.0f} / model shapes "
              f"{r['gemm']['model_shapes_gflops']:.0f} GFLOP/s; forward {r['fraction_of_model_shape_peak_forward']:.0%}, "
              f"end to end {r['fraction_of_model_shape_peak_end_to_end']:.0%} of the model-shape peak; "
              f"pad waste {r['pad_waste_this_run']:.1%}", flush=True)
        if "pad_waste_store" in r:
            print("pad waste over the store:", json.dumps(r["pad_waste_store"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
