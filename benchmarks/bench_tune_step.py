"""teacher-tune's training step (issue 10): forward+backward samples/s and its fraction of the bf16 GEMM peak,
beside the same model's forward-only pass over the same prompts, in one process.

The model is loaded as `teacher-tune` loads it (float32 weights, one bf16 autocast region per forward where
`--dtype auto` picks bf16), wrapped by `apply_method` with the CPU profile's settings (params.yaml
teacher_tune: LoRA r16 on 7 projections of the top 4 layers), and trained by `pipeline.teacher.tune.train`
itself; the prompts are teacher-dump's (the default template, 20 candidates).

Useful FLOPs counted per prompt of T tokens: forward 2 * P_nonemb * T plus causal attention
2 * L * T^2 * d; backward through the top N layers only (the frozen layers below need no gradient) as the
input-gradient matmuls of those layers, 2 * P_layer * N * T plus 2x their attention. LoRA's own small
matmuls and the weight gradients of the adapters are not counted (a lower bound on the work done).

    .venv/bin/python benchmarks/bench_tune_step.py --prepared data/prepared \
        --candidates data/candidates/candidates.parquet --samples 32 --json benchmarks/results/bench_tune_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_teacher import gemm_peak, prompt_ids  # noqa: E402


def flops(cfg, n_params_nonemb: int, n_layer_params: int, lengths: list[int], top_layers: int) -> tuple[float, float]:
    """(forward, backward) useful FLOPs summed over the prompts (see the module docstring)."""
    layers, d = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    top = top_layers or layers
    fwd = sum(2 * n_params_nonemb * t + 2 * layers * t * t * d for t in lengths)
    bwd = sum(2 * n_layer_params * top * t + 2 * (2 * top * t * t * d) for t in lengths)
    return float(fwd), float(bwd)


def load_tune_model(prepared: Path, candidates: Path, n: int, dtype: str):
    """As teacher-tune loads it on a CPU (the caller bounds the kernel caches first, as run_tune does): (dtype
    choice, bf16 or None, float32 model with run_tune's attention, pad id, identifier ids, the first n of
    teacher-dump's default prompts as TuneExamples with seeded random labels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dtype_choice import choose_dtype
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.tune import TuneExample

    from pipeline.teacher.hf_backend import share_kv_heads

    source = resolve_teacher("embedded")
    choice = choose_dtype(dtype, torch.device("cpu"))
    bf16 = torch.bfloat16 if choice.dtype == torch.bfloat16 else None
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
    share_kv_heads(model, bf16, train=True)  # as run_tune on a CPU (the attention as in teacher-dump, same bits)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shim = SimpleNamespace(tokenizer=tokenizer, context_length=int(model.config.max_position_embeddings))
    ident, ids = prompt_ids(load_inputs(prepared, candidates, limit=n), shim)
    rng = np.random.default_rng(0)
    return choice, bf16, model, pad_id, ident, [TuneExample(p, int(rng.integers(len(ident)))) for p in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--samples", type=int, default=32, help="timed prompts (a batch-sized warm-up comes first)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from pipeline.teacher.dtype_choice import cpu_info
    from pipeline.teacher.heap import TRAINING_KERNEL_CACHE_CAPACITY, bound_kernel_caches
    from pipeline.teacher.tune import TuneConfig, apply_method, score_examples, train

    bound_kernel_caches(TRAINING_KERNEL_CACHE_CAPACITY)  # as teacher-tune (tune_run.run_tune), before any kernel
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    choice, bf16, model, pad_id, ident, examples = load_tune_model(a.prepared, a.candidates,
                                                                   a.samples + a.batch_size, a.dtype)
    warm, timed = examples[: a.batch_size], examples[a.batch_size:]
    lengths = [len(e.input_ids) for e in timed]

    n_emb = model.get_input_embeddings().weight.numel()
    p_nonemb = sum(p.numel() for p in model.parameters()) - n_emb
    p_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    f_fwd, f_bwd = flops(model.config, p_nonemb, p_layer, lengths, a.top_layers)
    peak = gemm_peak("bfloat16" if bf16 is not None else "float32", a.threads)

    # forward only (eval mode, the same autocast region as tune's held-out scoring)
    score_examples(model, warm, ident, pad_id, a.batch_size, compute_dtype=bf16)
    t = time.perf_counter()
    auto_scores = score_examples(model, timed, ident, pad_id, a.batch_size, compute_dtype=bf16)
    fwd_s = time.perf_counter() - t

    # the same forward with the weights themselves in bf16 (no autocast): what the frozen layers could run as
    native_s = None
    if bf16 is not None:
        native = copy.deepcopy(model).to(torch.bfloat16)
        score_examples(native, warm, ident, pad_id, a.batch_size)
        t = time.perf_counter()
        native_scores = score_examples(native, timed, ident, pad_id, a.batch_size)
        native_s = time.perf_counter() - t
        del native
    # the frozen Linear weights stored in bf16 (autocast would cast them to exactly these bits each forward);
    # the residual stream, norms and embeddings stay float32 as under autocast: should be bit-identical
    precast_s = precast_same = None
    if bf16 is not None:
        pre = copy.deepcopy(model)
        head = pre.get_output_embeddings()
        for m in pre.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                m.weight.data = m.weight.data.to(torch.bfloat16)
        score_examples(pre, warm, ident, pad_id, a.batch_size, compute_dtype=bf16)
        t = time.perf_counter()
        pre_scores = score_examples(pre, timed, ident, pad_id, a.batch_size, compute_dtype=bf16)
        precast_s = time.perf_counter() - t
        precast_same = bool(np.array_equal(pre_scores, auto_scores))
        del pre

    cfg = TuneConfig(method="lora", lora_r=a.lora_r, lora_alpha=2 * a.lora_r,
                     target_modules=tuple(a.target_modules.split(",")), top_layers=a.top_layers, lr=1e-3,
                     batch_size=a.batch_size, checkpoint_every=10**9, warmup_ratio=0.0)
    wrapped = apply_method(model, cfg)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_tune-") as tmp:
        train(wrapped, warm, ident, pad_id, cfg, Path(tmp) / "warm", "bench", compute_dtype=bf16)
        t = time.perf_counter()
        state = train(wrapped, timed, ident, pad_id, cfg, Path(tmp) / "timed", "bench", compute_dtype=bf16,
                      progress=lambda s, n: stamps.append(time.perf_counter()))
        train_wall = time.perf_counter() - t
    # steady: from the first optimizer step's end to the last's (start-up and the final checkpoint left out)
    steps = len(stamps)
    steady_s = (stamps[-1] - stamps[0]) / (steps - 1) * steps if steps > 1 else train_wall
    train_sps = len(timed) / steady_s
    res = {
        "command": "bench_tune_step.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_info()[0],
        "threads": a.threads, "dtype": choice.name, "samples": len(timed), "batch_size": a.batch_size,
        "mean_prompt_tokens": float(np.mean(lengths)), "top_layers": a.top_layers, "lora_r": a.lora_r,
        "trainable_params": int(sum(p.numel() for p in wrapped.parameters() if p.requires_grad)),
        "non_embedding_params": int(p_nonemb), "gemm_peak_gflops": peak,
        "forward_only": {"seconds": fwd_s, "samples_per_s": len(timed) / fwd_s,
                         "fraction_of_peak": f_fwd / fwd_s / 1e9 / peak},
        "train_step": {"seconds_steady": steady_s, "wall_with_final_checkpoint_s": train_wall,
                       "optimizer_steps": state.step, "samples_per_s": train_sps,
                       "fraction_of_peak": (f_fwd + f_bwd) / steady_s / 1e9 / peak,
                       "flops_backward_over_forward": f_bwd / f_fwd},
        "forward_bf16_weights": None if native_s is None else {
            "seconds": native_s, "samples_per_s": len(timed) / native_s,
            "fraction_of_peak": f_fwd / native_s / 1e9 / peak, "autocast_over_bf16_weights_time": fwd_s / native_s,
            "max_abs_score_diff_vs_autocast": float(np.abs(native_scores - auto_scores).max()),
            "same_top1": int((native_scores.argmax(1) == auto_scores.argmax(1)).sum())},
        "forward_precast_linear_weights": None if precast_s is None else {
            "seconds": precast_s, "over_autocast_time": precast_s / fwd_s, "bit_identical_scores": precast_same},
        "train_over_forward_time": steady_s / fwd_s,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
