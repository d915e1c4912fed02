"""GPU benchmark, HF against vLLM, one command, under 5 minutes, one JSON on stdout.

    python benchmarks/gpu_bench_vllm.py [--teacher embedded] [--samples 1024] [--gen-samples 256]

Needs a CUDA GPU, the project with its teacher extra and `vllm==0.32.0` (docs/VLLM.md). Prompts are
synthetic (10 history titles, 20 candidates from a fixed title list, the packaged template), so no
prepared data is needed. Each backend runs in its own subprocess (one holds the GPU at a time);
engine start and model load are reported apart from steady state. Not run yet: the development
machines have no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_prompts(tokenizer, n: int, k: int = 20, seed: int = 0):
    import numpy as np

    from pipeline.teacher.identifiers import identifier_token_ids, make_scheme
    from pipeline.teacher.prompt import load_template, render_prompt
    from tests.teacher_fixtures import TITLES

    rng = np.random.default_rng(seed)
    scheme = make_scheme("letters", k)
    template = load_template()
    open_id = tokenizer.encode("[", add_special_tokens=False)[0]
    out = []
    for _ in range(n):
        picks = rng.permutation(len(TITLES))
        hist = [TITLES[i] for i in picks[:10]]
        cands = [TITLES[i % len(TITLES)] + f" #{j}" for j, i in enumerate(rng.integers(0, len(TITLES), k))]
        out.append(render_prompt(template, tokenizer, hist, cands, scheme, 4096, open_id).input_ids)
    return out, identifier_token_ids(scheme, tokenizer)


def one(backend: str, teacher: str, samples: int, gen_samples: int, batch: int, max_new: int) -> dict:
    from pipeline.teacher.convert import resolve_teacher

    location = resolve_teacher(teacher).location
    t0 = time.perf_counter()
    if backend == "hf":
        from pipeline.teacher.hf_backend import HFConfig, HFTeacher

        model = HFTeacher(HFConfig(location, dtype="auto", batch_size=batch))
    else:
        from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher

        model = VLLMTeacher(VLLMConfig(location, dtype="auto"))
    ids, ident = synthetic_prompts(model.tokenizer, max(samples, gen_samples))
    res = {"backend": backend, "dtype": model.dtype_name, "load_s": time.perf_counter() - t0}
    for mode, n in (("first-token", samples), ("generate", gen_samples)):
        budget = {"max_new_tokens": max_new} if mode == "generate" else {}
        t = time.perf_counter()
        model.run(ids[:8], ident, mode, **budget)  # warm-up, starts the engine this mode needs
        warm = time.perf_counter() - t
        starts = len(getattr(getattr(model, "engines", None), "starts", []))
        t = time.perf_counter()
        model.run(ids[:n], ident, mode, **budget)
        wall = time.perf_counter() - t
        switch = sum(s[2] for s in getattr(getattr(model, "engines", None), "starts", [])[starts:])
        tokens = sum(len(i) for i in ids[:n])
        res[mode] = {"samples": n, "warmup_s": warm, "wall_s": wall, "engine_switch_s": switch,
                     "samples_per_s": n / (wall - switch), "prompt_tok_per_s": tokens / (wall - switch)}
    # every engine start (kind, max_model_len, seconds): vLLM's start-up, CUDA-graph capture included
    res["engine_starts_s"] = [list(x) for x in getattr(getattr(model, "engines", None), "starts", [])]
    if hasattr(model, "close"):
        model.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="embedded")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--gen-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="HF batch size")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--hf-timeout", type=int, default=100, help="seconds for the HF subprocess")
    ap.add_argument("--vllm-timeout", type=int, default=190,
                    help="seconds for the vLLM subprocess (three engine starts: pool, generate, pool again)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.teacher, a.samples, a.gen_samples, a.batch_size, a.max_new_tokens)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this benchmark is for a GPU machine (benchmarks/bench_vllm.py is the CPU one)")
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "vllm"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    report = {"gpu": torch.cuda.get_device_name(0), "teacher": a.teacher, "versions": versions, "results": {}}
    for backend in ("hf", "vllm"):
        cmd = [sys.executable, __file__, "--one", backend, "--teacher", a.teacher, "--samples", str(a.samples),
               "--gen-samples", str(a.gen_samples), "--batch-size", str(a.batch_size),
               "--max-new-tokens", str(a.max_new_tokens)]
        try:  # HF 100 s, vLLM 190 s by default: the whole run stays under 5 minutes
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 timeout=a.hf_timeout if backend == "hf" else a.vllm_timeout,
                                 env={**os.environ, "GEDISTILL_NO_PROGRESS": "1"})
        except subprocess.TimeoutExpired as e:
            report["results"][backend] = {"error": f"timed out after {e.timeout} s"}
            continue
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        report["results"][backend] = json.loads(line[7:]) if line else {"error": out.stderr[-1500:]}
    r = report["results"]
    if all("error" not in r[b] for b in ("hf", "vllm")):
        report["vllm_over_hf"] = {m: r["vllm"][m]["samples_per_s"] / r["hf"][m]["samples_per_s"]
                                  for m in ("first-token", "generate")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
