"""Keep glibc's heap between the teacher's batches instead of handing it back to the OS after each one.

A CPU forward allocates and frees the same few hundred MB for every batch. With glibc's defaults,
blocks above a (dynamic, at most 32 MiB) threshold come from mmap and go back on free, and a free
top of the heap above the trim threshold is returned too; the next batch then faults the same pages
in again. Since a shard's batches run longest first (hf_backend.HFTeacher.run), each batch frees
more than the next needs: 12.0M minor page faults and 40 s of system time for 512 samples. Raising
both thresholds keeps those pages mapped (0.13M faults, 1.4 s): 0.84x the time batch by batch, the
same peak memory (the first, largest batch's), the same bits (BENCHMARKS.md, "teacher-dump: glibc's
heap kept between batches"). Numerics are untouched: this only decides where malloc gets memory.

Only on glibc (Linux); a process whose MALLOC_*_ / GLIBC_TUNABLES already set these keeps the user's
choice; GEDISTILL_KEEP_HEAP=0 turns it off (for side-by-side runs).

Two more things keep the dump's memory flat across shards (BENCHMARKS.md, "teacher-dump: memory flat
across shards"):
- bound_kernel_caches: oneDNN's primitive cache and ideep's LRU cache keep kernels per input shape, 1024
  entries each by default, about 2.4 MB per new padded width. Every batch of a shard has a new width, so
  the dump's live heap grew ~2.2 MB per batch until the caches were full (+111 MB over one 943-row
  shard; part of the +0.5 GB from 1 to 4 such shards). A batch's layers share one shape, so a few entries
  are all a forward reuses. 4 bound them: the entries that do stay live across batches also split the heap's
  free blocks, so fewer of them means less fragmentation too. Over 15 shards of 64 rows on a Xeon with AMX,
  glibc's heap grew +136 to +172 MiB and the per-shard peak RSS +103 to +200 MiB at 4, against +454 to +498
  and +203 to +440 at 32, in 0.93-0.96x the time; 1 entry thrashes (1.2x the time), 8 sits between
  (BENCHMARKS.md, "kernel caches at 4 entries"). Set only if the environment does not, and effective only
  when set before the process's first oneDNN kernel.
- release_heap: the kept heap fragments (each shard starts again with its widest batch, and glibc's free
  chunks no longer fit it), so RSS grew ~100-150 MB per shard although the live heap did not.
  malloc_trim(0) every TRIM_EVERY batches and after each shard hands every free page back: four shards of
  256 rows peaked at 1,217-1,300 MiB against 1,231-1,684 before and 1,213-1,480 with a trim only after
  each shard, for about 1.5% more time (the next batch faults its pages in again; 0.7M minor faults per
  384 samples against 0.3M), same bits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only a free top of 2 GiB or more
MMAP_THRESHOLD = 1 << 30  # blocks under 1 GiB come from the heap, so their pages are reused
ENV_OFF = "GEDISTILL_KEEP_HEAP"
TRIM_EVERY = 4  # batches between two release_heap calls within a shard
ENV_TRIM = "GEDISTILL_TRIM_EVERY"  # for side-by-side runs: N batches, 0 = only at the end of a shard
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
KERNEL_CACHE_CAPACITY = 4  # teacher-dump's forwards
# teacher-tune's training step: its backward adds kernels of other shapes (data and weight gradients) to every
# layer, and at 4 entries they evict each other: benchmarks/bench_tune_step.py's step took 1.9-2.6x the time at 4
# against 32, its autocast forward 1.1-1.6x (BENCHMARKS.md, "kernel caches at 4 entries").
TRAINING_KERNEL_CACHE_CAPACITY = 32
# read once, at the process's first oneDNN kernel; the older DNNL_ name counts as the user's choice too
_CACHE_SETTINGS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("DNNL_PRIMITIVE_CACHE_CAPACITY",), "LRU_CACHE_CAPACITY": ()}


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # musl and other libcs have no such string
            return None
    except (ValueError, OSError, AttributeError):  # not POSIX, or the name is unknown here
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap() -> str:
    """Raise glibc's trim and mmap thresholds for this process; returns what was done (it is also logged)."""
    if os.environ.get(ENV_OFF, "1") == "0":
        why = f"left at glibc's defaults ({ENV_OFF}=0)"
    elif any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        why = "left as the environment sets it (MALLOC_*_ or GLIBC_TUNABLES)"
    elif (libc := _glibc()) is None:
        why = "left alone (not glibc)"
    elif libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD)) != 1 or \
            libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)) != 1:
        why = "left at glibc's defaults (mallopt refused the thresholds)"
    else:
        why = "kept between batches (glibc mmap threshold 1 GiB, trim threshold 2 GiB)"
    log.info("heap %s", why)
    return why


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> str:
    """Cap oneDNN's and ideep's per-shape kernel caches at `capacity` entries (KERNEL_CACHE_CAPACITY for
    inference, TRAINING_KERNEL_CACHE_CAPACITY for a training step), unless the environment sets them. Takes
    effect only before the process's first oneDNN kernel (HFTeacher calls it before loading the model);
    returns what was done (also logged)."""
    chosen = []
    for name, aliases in _CACHE_SETTINGS.items():
        if not any(k in os.environ for k in (name, *aliases)):
            os.environ[name] = str(capacity)
            chosen.append(name)
    why = (f"kernel caches bounded at {capacity} entries ({', '.join(chosen)})" if chosen
           else "kernel caches left as the environment sets them")
    log.info("%s", why)
    return why


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trim_period() -> int:
    """Batches between two release_heap calls within a shard: TRIM_EVERY, or GEDISTILL_TRIM_EVERY (0: only
    after the shard)."""
    value = os.environ.get(ENV_TRIM, str(TRIM_EVERY))
    try:
        return max(0, int(value))
    except ValueError:
        raise UsageError(f"{ENV_TRIM}={value!r}: give a whole number of batches (0: only after each shard)") from None


def release_heap() -> float | None:
    """malloc_trim(0): hand back every free page of glibc's heap, the middle included (glibc >= 2.8), not
    only a free top. HFTeacher.run calls it every TRIM_EVERY batches and after each shard, so a batch
    faults its working set in again only after a trim. Returns the MiB released, or None where this is not
    glibc."""
    if (libc := _glibc()) is None:
        return None
    before = _resident_mib()
    libc.malloc_trim(ctypes.c_size_t(0))
    freed = before - _resident_mib()
    log.debug("heap trimmed: %.0f MiB back to the OS", freed)
    return freed
