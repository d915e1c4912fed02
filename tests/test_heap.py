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
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
"""


def retained_mib(**env: str) -> tuple[str, int]:
    """In a fresh process: keep_heap's answer, and MiB still resident after a 256 MiB block is freed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
             and k != heap.ENV_OFF}
    r = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                       timeout=60, check=True)
    why, mib = r.stdout.strip().splitlines()
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
