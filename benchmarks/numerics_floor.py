"""How far apart the teacher's outputs are when nothing changes but the CPU kernels (issue 10's numerics rule).

Issue 10 lets a speed-up change `h_dec` only within "cosine >= 0.9999 per row" of today's store, with
"rankings identical except ties". This measures what the unchanged code gives when only the kernels that
compute it change, as they do from one CPU to another, on teacher-dump's own prompts and batches
(`HFTeacher.run`, default template, K=20, batch 16, fused forwards):

- `native`: this machine as it is (here: oneDNN with AMX, ATen's AVX-512 kernels);
- `no-amx`: oneDNN capped at AVX512_CORE_BF16 (`ONEDNN_MAX_CPU_ISA`): the bf16 instructions of an AMD Zen 4
  or an Intel Cooper Lake, no AMX tiles;
- `epyc`: that, plus ATen's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`): what the issue's AMD EPYC ran
  (torch reported "AVX2" there, its flags include avx512_bf16);
- `rows/4`: this machine, each padded batch of 16 computed as four sub-batches of 4 rows with the same
  padding: the same prompts, positions and masks, only the GEMMs' row count M differs;
- `fp32`: `--dtype float32`, the reference all the bf16 variants approximate.

Each variant runs in its own process (the kernel choices are read at a process's first kernel). Reported per
pair: min and median cosine of h_dec per row, the share of rows whose 20 identifier scores rank identically,
identically except exact ties, and with the same top-1, and the largest score difference.

    .venv/bin/python benchmarks/numerics_floor.py --prepared /work/runs/scal/prepared \
        --candidates /work/runs/scal/candidates.parquet --samples 96 --json benchmarks/results/numerics_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (environment, dtype, rows per GEMM sub-batch or 0)
    "native": ({}, "auto", 0),
    "no-amx": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "auto", 0),
    "epyc": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx2"}, "auto", 0),
    "rows/4": ({}, "auto", 4),
    "fp32": ({}, "float32", 0),
}


def child(a: argparse.Namespace) -> None:
    import torch

    from benchmarks.bench_teacher import prompt_ids
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    _, dtype, rows = VARIANTS[a.child]
    torch.set_num_threads(a.threads)
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, dtype=dtype, batch_size=a.batch_size))
    if rows:  # same padded batch, GEMMs over `rows` prompts at a time
        def sub_batches(prompts, ident_ids, mode, budget):
            ids, mask, pos = teacher._pad(prompts)
            hs = [teacher.base(input_ids=ids[r:r + rows], attention_mask=mask[r:r + rows],
                               position_ids=pos[r:r + rows], use_cache=False).last_hidden_state[:, -1, :]
                  for r in range(0, len(prompts), rows)]
            h = torch.cat(hs)
            return h.float().cpu().numpy(), teacher._ident_scores(h, ident_ids).cpu().numpy(), None
        teacher._batch = sub_batches
    inputs = load_inputs(a.prepared, a.candidates, limit=a.samples)
    ident, ids = prompt_ids(inputs, teacher)
    t = time.perf_counter()
    out = teacher.run(ids, ident)
    np.savez(a.out, h=out.h_dec, s=out.scores, secs=time.perf_counter() - t,
             capability=torch.backends.cpu.get_cpu_capability(), dtype=teacher.dtype_name)


def ranks_agree_except_ties(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Per row: no pair of identifiers is strictly ordered one way by `sa` and the other way by `sb`."""
    da = np.sign(sa[:, :, None] - sa[:, None, :])
    db = np.sign(sb[:, :, None] - sb[:, None, :])
    return ~((da * db) < 0).any(axis=(1, 2))


def compare(a: dict, b: dict) -> dict:
    ha, hb = a["h"].astype(np.float64), b["h"].astype(np.float64)
    cos = (ha * hb).sum(1) / np.linalg.norm(ha, axis=1) / np.linalg.norm(hb, axis=1)
    sa, sb = a["s"], b["s"]
    ra, rb = np.argsort(-sa, 1, kind="stable"), np.argsort(-sb, 1, kind="stable")
    return {"min_cosine": float(cos.min()), "median_cosine": float(np.median(cos)),
            "rows_below_0.9999": int((cos < 0.9999).sum()),
            "rankings_identical": float((ra == rb).all(1).mean()),
            "rankings_identical_except_ties": float(ranks_agree_except_ties(sa, sb).mean()),
            "top1_identical": float((ra[:, 0] == rb[:, 0]).mean()),
            "max_abs_score_diff": float(np.abs(sa - sb).max()),
            "bit_identical_h_dec": bool(np.array_equal(a["h"], b["h"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--candidates", type=Path, default=ROOT / "data/candidates/candidates.parquet")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    names = a.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            env, _, _ = VARIANTS[name]
            out = Path(tmp) / f"{name.replace('/', '_')}.npz"
            cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--prepared", str(a.prepared),
                   "--candidates", str(a.candidates), "--samples", str(a.samples),
                   "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
            subprocess.run(cmd, check=True, env={**os.environ, **env})
            with np.load(out) as z:
                runs[name] = {k: z[k] for k in z.files}
            print(f"{name:>7}: {float(runs[name]['secs']):.1f} s, ATen {runs[name]['capability']}, "
                  f"{runs[name]['dtype']}", flush=True)
    ref = names[0]
    pairs = [(ref, n) for n in names[1:]] + ([(n, "fp32") for n in names if n not in (ref, "fp32")]
                                            if "fp32" in names else [])
    result = {"command": "numerics_floor.py " + " ".join(sys.argv[1:]), "samples": a.samples, "batch_size": a.batch_size,
              "threads": a.threads, "cpu": _cpu(), "pairs": {}}
    print(f"{'pair':>18} | min cos | median cos | rows < 0.9999 | rankings same | same exc. ties | top-1 | max |ds|")
    for x, y in pairs:
        c = compare(runs[x], runs[y])
        result["pairs"][f"{x} vs {y}"] = c
        print(f"{x + ' vs ' + y:>18} | {c['min_cosine']:.6f} | {c['median_cosine']:.6f} | "
              f"{c['rows_below_0.9999']:>4}/{a.samples} | {c['rankings_identical']:.2f} | "
              f"{c['rankings_identical_except_ties']:.2f} | {c['top1_identical']:.2f} | "
              f"{c['max_abs_score_diff']:.3f}{'  (bit-identical)' if c['bit_identical_h_dec'] else ''}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


def _cpu() -> str:
    from pipeline.teacher.dtype_choice import cpu_info

    model, flags = cpu_info()
    return model + "".join(f", {f}" for f in ("amx_bf16", "avx512_bf16") if f in flags)


if __name__ == "__main__":
    main()
