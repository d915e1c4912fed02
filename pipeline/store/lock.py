"""Who may write a store directory at once: POSIX byte-range locks on one empty `.lock` file in it.

- byte 0, the run lock: every writer holds it shared; replacing a mismatched store needs it exclusive.
- byte 1, the manifest lock: held exclusively (blocking, milliseconds) while the manifest is read, the
  directory scanned and the manifest replaced, so that workers sharing a directory never drop each
  other's shards from it.
- byte 16 + i, shard i: a run holds its own shards exclusively for its whole life (non-blocking). A
  second `teacher-dump` on the same --out, or a second copy of one worker, is refused naming the
  holder's pid; workers with different --worker-index hold disjoint shards and run side by side.

fcntl (POSIX) locks rather than flock: they work on NFS (where flock is emulated with them) and F_GETLK
names the holder. They belong to the process: one descriptor per file per process, kept open for the
process's life (closing any descriptor of the file would drop them all). A process never conflicts
with itself, so a test that reruns a store in-process is not refused by its own earlier run.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UsageError

LOCK_FILE = ".lock"
RUN_BYTE, MANIFEST_BYTE, SHARD_BYTE0 = 0, 1, 16
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding)

_fds: dict[str, int] = {}


def _fd(root: Path) -> int:
    key = os.path.realpath(Path(root) / LOCK_FILE)
    if key not in _fds:
        _fds[key] = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    return _fds[key]


def _holder(fd: int, start: int) -> int | None:
    """The pid holding a lock that conflicts with an exclusive one on byte `start` (None if unknown)."""
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
        l_type, _, _, _, pid = struct.unpack(_FLOCK, got)
        return pid if l_type != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None


def _try(fd: int, start: int, exclusive: bool) -> tuple[bool, int | None]:
    """Take the lock on one byte without waiting: (taken, pid of the holder when not)."""
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB, 1, start)
        return True, None
    except OSError:
        return False, _holder(fd, start)


def _who(pid: int | None) -> str:
    return f"pid {pid}" if pid else "another process (pid unknown: another host?)"


def hold_run(root: Path, exclusive: bool = False) -> None:
    """The run lock: shared for writing, exclusive to delete a mismatched store (then back to shared)."""
    ok, pid = _try(_fd(root), RUN_BYTE, exclusive)
    if ok:
        return
    what = "delete and replace" if exclusive else "write"
    raise UsageError(f"{root} is in use by {_who(pid)} (another teacher-dump or cache merge); cannot {what} it "
                     "now. Wait for that process to finish, or use another --out directory.")


def claim_shards(root: Path, indices: Iterable[int], names: dict[int, str]) -> None:
    """Hold these shards for this process's life; refuse if another process holds any of them."""
    fd, taken = _fd(root), []
    for i in indices:
        ok, pid = _try(fd, SHARD_BYTE0 + i, True)
        if not ok:
            for j in taken:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHARD_BYTE0 + j)
            raise UsageError(
                f"{root}: {names[i]} is being written by {_who(pid)}, another teacher-dump on this --out; two "
                "runs on one directory would corrupt it. Wait for it to finish, or use another --out; workers "
                "sharing a directory need --num-workers W and distinct --worker-index values.")
        taken.append(i)


def writer_pid(root: Path) -> int | None:
    """The pid of another process holding shards of this store (a live writer; 0 if its pid is unknown), or
    None. Takes no lock: a reader syncing a local copy (store.remote) must not rewrite a writer's files."""
    try:
        got = fcntl.fcntl(_fd(root), fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHARD_BYTE0, 0, 0))
    except OSError:
        return None
    l_type, _, _, _, pid = struct.unpack(_FLOCK, got)
    return None if l_type == fcntl.F_UNLCK else max(pid, 0)


@contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """Exclusive, waiting: the read-scan-replace of the manifest is atomic among processes."""
    fd = _fd(root)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, MANIFEST_BYTE)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, MANIFEST_BYTE)


def release(root: Path | None = None) -> None:
    """Drop this process's locks on one store (or all): for tests and tools that hand a store on."""
    keys = [os.path.realpath(Path(root) / LOCK_FILE)] if root is not None else list(_fds)
    for key in keys:
        fd = _fds.pop(key, None)
        if fd is not None:
            os.close(fd)
