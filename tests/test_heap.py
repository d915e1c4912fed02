"""The HF teacher keeps glibc's heap between batches (pipeline/teacher/heap.py, issue 10).

Why: longest-first batches (hf_backend.HFTeacher.run) made the dump's memory flat but, with glibc's
defaults, each batch handed pages back to the OS and the next faulted them in again (0.82-0.87x the
speed; BENCHMARKS.md). These tests check the allocator's behaviour itself, not only that mallopt was
called: in a fresh process, 256 MiB freed stays resident when the heap is kept and goes back when it
is not.

What each catches (each was broken on purpose and seen failing):
- keep_heap not calling mallopt (or with the wrong option numbers): the freed block goes back to the
  OS, `test_freed_memory_stays_mapped` fails;
- keep_heap overriding a user's MALLOC_TRIM_THRESHOLD_: `test_the_users_settings_win` fails;
- GEDISTILL_KEEP_HEAP=0 ignored: `test_it_can_be_turned_off` fails;
- HFTeacher on a CPU not calling it: `test_the_cpu_teacher_keeps_the_heap` fails (and the installed
  CLI's log line in test_entrypoint.py::test_teacher_dump_with_the_real_teacher).

Memory flat across shards (the same module):
- release_heap not trimming: `test_release_heap_hands_free_pages_back` fails;
- HFTeacher.run not calling it after a shard, or not every TRIM_EVERY batches within one:
  `test_the_cpu_teacher_releases_the_heap_after_each_run` fails;
- bound_kernel_caches not setting the caps, or setting them after the first oneDNN kernel (e.g. after the
  dtype probe or the model load): `test_the_teacher_bounds_its_kernel_caches` fails (the live heap grows
  with every new padded width as with the libraries' 1024-entry defaults);
- bound_kernel_caches overriding a user's setting: `test_kernel_caches_the_users_settings_win` fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.errors import UsageError
from pipeline.teacher import heap


needs_glibc = pytest.mark.skipif(heap._glibc() is None, reason="glibc's malloc only")

PROBE = """
import os
from pipeline.teacher.heap import keep_heap
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
print(keep_heap())
before = rss()
block = bytearray(256 << 20)  # zero-filled: every page touched
del block
print((rss() - before) >> 20)
if os.environ.get("PROBE_RELEASE"):
    from pipeline.teacher.heap import release_heap
    released = release_heap()
    print(f"{released:.0f} {(rss() - before) >> 20}")
"""


def retained_mib(**env: str) -> tuple[str, int]:
    """In a fresh process: keep_heap's answer, and MiB still resident after a 256 MiB block is freed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
             and k != heap.ENV_OFF}
    r = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                       timeout=60, check=True)
    why, mib = r.stdout.strip().splitlines()[:2]
    return why, int(mib)


@needs_glibc
def test_freed_memory_stays_mapped():
    why, kept = retained_mib()
    assert why.startswith("kept between batches")
    assert kept >= 200, f"only {kept} MiB of a freed 256 MiB block stayed resident"


@needs_glibc
def test_it_can_be_turned_off():
    why, kept = retained_mib(**{heap.ENV_OFF: "0"})
    assert "GEDISTILL_KEEP_HEAP=0" in why
    assert kept < 50, f"{kept} MiB stayed resident with glibc's defaults"


@needs_glibc
def test_the_users_settings_win():
    """A user who set glibc's thresholds keeps them: a small trim threshold hands the block back."""
    why, kept = retained_mib(MALLOC_TRIM_THRESHOLD_="131072")
    assert "as the environment sets it" in why
    assert kept < 50


def test_not_glibc_is_left_alone(monkeypatch):
    monkeypatch.delenv(heap.ENV_OFF, raising=False)
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_heap() == "left alone (not glibc)"


@pytest.mark.teacher
def test_the_cpu_teacher_keeps_the_heap(monkeypatch):
    pytest.importorskip("transformers")
    from pipeline.teacher import hf_backend
    from pipeline.teacher.convert import resolve_teacher

    calls = []
    monkeypatch.setattr(hf_backend, "keep_heap", lambda: calls.append(1) or "kept (spy)")
    monkeypatch.setattr(hf_backend.torch.cuda, "is_available", lambda: False)
    teacher = hf_backend.HFTeacher(hf_backend.HFConfig(resolve_teacher("embedded").location, dtype="float32"))
    assert calls == [1] and teacher.heap == "kept (spy)"


@needs_glibc
def test_release_heap_hands_free_pages_back():
    """The kept heap holds a freed 256 MiB block; release_heap (once per shard) hands it back."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
             and k != heap.ENV_OFF}
    r = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PROBE_RELEASE": "1"}, capture_output=True,
                       text=True, timeout=60, check=True)
    why, kept, after = r.stdout.strip().splitlines()
    assert why.startswith("kept between batches") and int(kept) >= 200
    released, resident = (int(x) for x in after.split())
    assert released >= 200, f"release_heap reported {released} MiB back"
    assert resident < 50, f"{resident} MiB of the freed block still resident after release_heap"


def test_release_heap_not_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.release_heap() is None


def test_kernel_caches_the_users_settings_win(monkeypatch):
    env = {k: v for k, v in os.environ.items() if "CACHE_CAPACITY" not in k}
    monkeypatch.setattr(os, "environ", env)
    assert heap.bound_kernel_caches().startswith("kernel caches bounded at 4 ")
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == env["LRU_CACHE_CAPACITY"] == "4"
    env = {}
    monkeypatch.setattr(os, "environ", env)
    assert heap.bound_kernel_caches(heap.TRAINING_KERNEL_CACHE_CAPACITY).startswith("kernel caches bounded at 32 ")
    assert env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}
    env = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"}  # the older oneDNN name counts too
    monkeypatch.setattr(os, "environ", env)
    assert heap.bound_kernel_caches() == "kernel caches left as the environment sets them"
    assert env == {"DNNL_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"}


CACHE_PROBE = """
import ctypes, sys, torch
from pipeline.teacher.hf_backend import HFTeacher, HFConfig
from pipeline.teacher.convert import resolve_teacher
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
torch.cuda.is_available = lambda: False
t = HFTeacher(HFConfig(resolve_teacher("embedded").location, dtype="bfloat16"))
with torch.inference_mode():
    t._batch([[100] * 40], [1, 2], "first-token", 0)
    used = libc.mallinfo2().uordblks
    for width in range(41, 41 + 32):  # 32 new padded widths, as a shard's batches have
        t._batch([[100] * width] * 4, [1, 2], "first-token", 0)
print((libc.mallinfo2().uordblks - used) / 2**20)
"""


def onednn_bf16() -> bool:
    """Whether torch runs bf16 matmuls through oneDNN on this CPU (it needs AVX-512; the Xeon with AMX and the
    avx512_bf16 EPYC have it). On an AVX2-only CPU (an AMD EPYC Zen 3, 2026-12-01) it does not: the probe's caches
    stayed empty there (0.1 MiB of growth with 1024 entries)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and (check is None or bool(check()))


@needs_glibc
@pytest.mark.teacher
def test_the_teacher_bounds_its_kernel_caches():
    """The real teacher, bf16 on the CPU, fresh processes: the live heap's growth over 32 new batch shapes,
    with the teacher's bounded caches against the libraries' defaults (1024 entries, set as a user would)."""
    pytest.importorskip("transformers")
    if not onednn_bf16():
        pytest.skip("torch has no oneDNN bf16 path on this CPU (no AVX-512): bf16 linears run through ATen's own GEMM, "
                    "so no per-shape kernel cache grows and there is nothing to bound")
    clean = {k: v for k, v in os.environ.items() if "CACHE_CAPACITY" not in k}

    def growth(**env: str) -> float:
        r = subprocess.run([sys.executable, "-c", CACHE_PROBE], env={**clean, **env}, capture_output=True,
                           text=True, timeout=300, check=True)
        return float(r.stdout.strip().splitlines()[-1])

    bounded = growth()
    default = growth(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert default > 30, f"the defaults' caches grew the heap only {default:.1f} MiB: the probe measures nothing"
    assert bounded < default / 2, f"bounded caches grew the heap {bounded:.1f} MiB, the defaults {default:.1f}"


@pytest.mark.teacher
def test_the_cpu_teacher_releases_the_heap_after_each_run(monkeypatch):
    pytest.importorskip("transformers")
    from pipeline.teacher import hf_backend
    from pipeline.teacher.convert import resolve_teacher

    monkeypatch.setattr(hf_backend.torch.cuda, "is_available", lambda: False)
    teacher = hf_backend.HFTeacher(hf_backend.HFConfig(resolve_teacher("embedded").location, dtype="float32",
                                                       batch_size=2))
    calls = []
    monkeypatch.setattr(hf_backend, "release_heap", lambda: calls.append(1))
    assert teacher.trim_every == heap.TRIM_EVERY == 4
    prompts = [[100] * n for n in (5, 7, 6, 9, 8, 5, 6, 7, 5, 6)]  # five batches of two
    teacher.run(prompts, [1, 2])  # after the 4th batch, and at the end of the run
    assert calls == [1, 1]
    teacher.run(prompts[:2], [1, 2])
    assert calls == [1, 1, 1]
    calls.clear()
    teacher.run(prompts[:8], [1, 2])  # four batches: the end-of-run trim only, not a second one right before it
    assert calls == [1]
    calls.clear()
    teacher.trim_every = 0  # GEDISTILL_TRIM_EVERY=0: only at the end
    teacher.run(prompts, [1, 2])
    assert calls == [1]


def test_trim_period(monkeypatch):
    monkeypatch.delenv(heap.ENV_TRIM, raising=False)
    assert heap.trim_period() == heap.TRIM_EVERY
    monkeypatch.setenv(heap.ENV_TRIM, "0")
    assert heap.trim_period() == 0
    monkeypatch.setenv(heap.ENV_TRIM, "every other")
    with pytest.raises(UsageError, match="GEDISTILL_TRIM_EVERY='every other': give a whole number"):
        heap.trim_period()
