"""The teacher's batches with glibc's heap kept (pipeline/teacher/heap.py) against glibc's defaults, batch by
batch in ping-pong, so that both see the same machine.

    .venv/bin/python benchmarks/ab_heap_pingpong.py --prepared <run>/prepared --candidates <run>/candidates.parquet \
        --prompts 512 --batch-size 16 --threads 2 --json benchmarks/results/ab_heap_pingpong.json

Why ping-pong: the allocator setting is process-wide, so the two variants need two processes, and on this
VM the speed of one whole process run drifted by 1.7x between runs of the same code (2.0-3.5 samples/s)
while the effect looked for is 10-20%. Here two children (GEDISTILL_KEEP_HEAP=0 and the default) each load
the embedded teacher and the same prompts, and run teacher-dump's batches in its order (length-sorted,
longest first, `HFTeacher._batch`) one batch at a time, taking turns (the first to go alternates), so
every pair of batches ran within seconds of each other. Each child reports per batch: wall, CPU (user,
sys) and minor page faults; at the end its peak RSS and a hash of all h_dec and scores (must be equal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = {"defaults": "0", "kept": "1"}  # GEDISTILL_KEEP_HEAP


def child(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from benchmarks.bench_teacher import prompt_ids
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.dump import load_inputs
    from pipeline.teacher.hf_backend import HFConfig, HFTeacher

    torch.set_num_threads(a.threads)
    inputs = load_inputs(a.prepared, a.candidates, limit=a.prompts)
    teacher = HFTeacher(HFConfig(resolve_teacher("embedded").location, batch_size=a.batch_size))
    ident, ids = prompt_ids(inputs, teacher)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # as HFTeacher.run
    batches = [order[s:s + a.batch_size] for s in reversed(range(0, len(order), a.batch_size))]
    digest = hashlib.sha256()
    print(json.dumps({"ready": len(batches), "heap": teacher.heap, "dtype": teacher.dtype_name}), flush=True)
    for line in sys.stdin:
        i = int(line)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with torch.inference_mode():
            h, s, _ = teacher._batch([ids[j] for j in batches[i]], ident, "first-token", 0)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        digest.update(np.ascontiguousarray(h).tobytes() + np.ascontiguousarray(s).tobytes())
        print(json.dumps({"batch": i, "wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime,
                          "sys_s": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
                          "tokens": sum(len(ids[j]) for j in batches[i])}), flush=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "sha256": digest.hexdigest()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--candidates", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    argv = [sys.executable, __file__, "--child", "--prepared", str(a.prepared), "--candidates", str(a.candidates),
            "--prompts", str(a.prompts), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    procs = {name: subprocess.Popen(argv, env={**clean, "GEDISTILL_KEEP_HEAP": flag, "OMP_NUM_THREADS": str(a.threads)},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
             for name, flag in VARIANTS.items()}
    head = {n: json.loads(p.stdout.readline()) for n, p in procs.items()}
    n_batches = head["kept"]["ready"]
    load0 = os.getloadavg()
    rows: dict[str, list[dict]] = {n: [] for n in procs}
    names = list(procs)
    for i in range(n_batches):
        for n in (names if i % 2 == 0 else names[::-1]):
            procs[n].stdin.write(f"{i}\n")
            rows[n].append(json.loads(procs[n].stdout.readline()))
        print(f"batch {i + 1}/{n_batches}: " + ", ".join(f"{n} {rows[n][-1]['wall_s']:.2f} s" for n in names),
              file=sys.stderr, flush=True)
    tail = {}
    for n, p in procs.items():
        p.stdin.close()
        tail[n] = json.loads(p.stdout.readline())
        p.wait()
    ratios = [k["wall_s"] / d["wall_s"] for k, d in zip(rows["kept"], rows["defaults"])]
    summary = {n: {"heap": head[n]["heap"], "wall_s": sum(r["wall_s"] for r in rows[n]),
                   "user_s": sum(r["user_s"] for r in rows[n]), "sys_s": sum(r["sys_s"] for r in rows[n]),
                   "minor_faults": sum(r["minflt"] for r in rows[n]),
                   "samples_per_s": a.prompts / sum(r["wall_s"] for r in rows[n]), **tail[n]} for n in names}
    from pipeline.teacher.dtype_choice import cpu_info

    out = {"command": " ".join([sys.executable, *sys.argv]), "cpu": cpu_info()[0], "load_avg_before": load0,
           "load_avg_after": os.getloadavg(), "prompts": a.prompts, "batch_size": a.batch_size, "threads": a.threads,
           "dtype": head["kept"]["dtype"], "summary": summary,
           "kept_over_defaults_per_batch": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                            "faster_in": sum(r < 1 for r in ratios), "of": len(ratios)},
           "outputs_identical": tail["kept"]["sha256"] == tail["defaults"]["sha256"], "batches": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "batches"}, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
