"""Where teacher-dump's memory goes, batch by batch: resident set and glibc's heap after every batch and shard.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/trace_teacher_memory.py --json trace.json -- \
        --prepared P --candidates C --out /tmp/store --limit 256 --shard-rows 32 --batch-size 16 --threads 2

Everything after `--` goes to `gedistill teacher-dump`, run in this process (the CLI's own code) with
HFTeacher._batch and StoreWriter.write_shard wrapped to record, after each: VmRSS, and from glibc's
mallinfo2 the heap's size ("arena"), what is live in it ("used") and what is free in it ("free"). Live
memory that grows batch after batch is a cache or a leak; free memory that grows is fragmentation (the
process holds pages it does not use). The printed summary gives both per shard.
Environment variables to compare settings with: GEDISTILL_KEEP_HEAP=0 (glibc's defaults),
ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY (the kernel caches; 1024 is the libraries' default).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv[:split])
    dump_args = argv[split + 1:]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def sample() -> dict[str, int]:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        m = libc.mallinfo2()
        return {"rss_mib": int(status["VmRSS"].split()[0]) >> 10, "hwm_mib": int(status["VmHWM"].split()[0]) >> 10,
                "heap_mib": m.arena >> 20, "used_mib": m.uordblks >> 20, "free_mib": m.fordblks >> 20,
                "mmapped_mib": m.hblkhd >> 20}

    from pipeline.teacher import dump, hf_backend

    trace: list[dict] = []
    t0 = time.perf_counter()
    batch, write = hf_backend.HFTeacher._batch, dump.StoreWriter.write_shard

    def traced_batch(self, prompts, *args, **kwargs):
        out = batch(self, prompts, *args, **kwargs)
        trace.append({"t": round(time.perf_counter() - t0, 2), "kind": "batch", "rows": len(prompts),
                      "width": max(map(len, prompts)), **sample()})
        return out

    def traced_write(self, index, table):
        out = write(self, index, table)
        trace.append({"t": round(time.perf_counter() - t0, 2), "kind": "shard", "index": index, **sample()})
        return out

    hf_backend.HFTeacher._batch = traced_batch
    dump.StoreWriter.write_shard = traced_write
    from stages.cli import main as cli

    sys.argv = ["gedistill", "teacher-dump", *dump_args]
    try:
        cli()
    except SystemExit as e:
        if e.code:
            raise
    shards = [e for e in trace if e["kind"] == "shard"]
    peaks, last = [], 0
    for s in shards:  # the highest RSS after any batch of the shard
        i = trace.index(s)
        peaks.append(max(e["rss_mib"] for e in trace[last:i + 1]))
        last = i + 1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    import pipeline

    summary = {"command": "python benchmarks/trace_teacher_memory.py " + " ".join(argv), "code": pipeline.__file__,
               "env": {k: v for k, v in os.environ.items() if k.startswith(("GEDISTILL_", "ONEDNN_", "LRU_", "OMP_"))},
               "wall_s": round(time.perf_counter() - t0, 1), "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "minor_faults": ru.ru_minflt, "max_rss_mib": ru.ru_maxrss >> 10,
               "shards": [{**s, "peak_rss_mib": p} for s, p in zip(shards, peaks)]}
    a.json.write_text(json.dumps({**summary, "trace": trace}, indent=1))
    print(f"{summary['wall_s']} s, user {ru.ru_utime:.0f} s, sys {ru.ru_stime:.1f} s, {ru.ru_minflt / 1e6:.2f}M minor "
          f"faults, max RSS {ru.ru_maxrss >> 10} MiB (model load included)")
    print("shard  peak RSS  after: RSS  heap  live  free  (MiB)")
    for s, p in zip(shards, peaks):
        print(f"{s['index']:5d}  {p:8d}  {s['rss_mib']:10d}  {s['heap_mib']:4d}  {s['used_mib']:4d}  {s['free_mib']:4d}")


if __name__ == "__main__":
    main()
