"""Who may write a store at once (pipeline/store/lock.py), checked between real processes: POSIX locks are
per process, so every conflicting holder here is a forked child that takes its locks, reports, and holds
them until the test lets it exit. These are the writer's guarantees a crash test or a race test reaches
only through a subprocess (which a mutant never runs): two dumps on one --out are refused naming the
holder, a refused claim keeps nothing, a reader sees a live writer, and the manifest's update is atomic."""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.store import lock
from pipeline.store.lock import claim_shards, hold_run, manifest_lock, release, writer_pid

NAMES = {i: f"part-{i:05d}-of-00008.parquet" for i in range(8)}
OK, REFUSED, OTHER = 0, 3, 1


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "store"
    d.mkdir()
    yield d
    release(d)


_entered: list = []


def enter(cm) -> None:
    """Enter a context manager and keep it: a dropped generator-based one would exit (and unlock) at once."""
    _entered.append(cm)
    cm.__enter__()


def _run(action: Callable[[], object]) -> int:
    try:
        action()
        return OK
    except UsageError:
        return REFUSED
    except BaseException:  # noqa: BLE001 - any other failure is reported as such
        return OTHER


@contextmanager
def holder(action: Callable[[], object]) -> Iterator[int]:
    """A forked child that runs `action` (taking its locks) and holds them until the block ends; yields its pid."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = OTHER
        try:
            os.close(ready_r)
            os.close(done_w)
            code = _run(action)
            os.write(ready_w, bytes([code]))
            os.read(done_r, 1)  # hold the locks until the parent is done
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        got = os.read(ready_r, 1)
        assert got == bytes([OK]), f"the holder's own action failed (code {got!r})"
        yield pid
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(done_w)


def in_child(action: Callable[[], object]) -> int:
    """Run `action` in a fresh forked process (no locks of ours): OK, REFUSED (UsageError) or OTHER."""
    pid = os.fork()
    if pid == 0:
        code = OTHER
        try:
            code = _run(action)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_writers_share_the_run_lock_but_replacing_a_store_needs_it_alone(root):
    with holder(lambda: hold_run(root)) as pid:
        hold_run(root)  # a second writer (a worker) shares it
        with pytest.raises(UsageError) as e:
            hold_run(root, exclusive=True)
        assert str(e.value) == (
            f"{root} is in use by pid {pid} (another teacher-dump or cache merge); cannot delete and replace it "
            "now. Wait for that process to finish, or use another --out directory.")
    hold_run(root, exclusive=True)  # the holder has gone: this process alone may replace it
    assert in_child(lambda: hold_run(root)) == REFUSED  # and while it does, nobody may write
    hold_run(root)  # back to shared: now others may write again
    assert in_child(lambda: hold_run(root)) == OK


def test_a_writer_is_refused_while_a_store_is_being_replaced(root):
    with holder(lambda: hold_run(root, exclusive=True)) as pid:
        with pytest.raises(UsageError) as e:
            hold_run(root)
        assert str(e.value).startswith(f"{root} is in use by pid {pid} (another teacher-dump or cache merge); "
                                       "cannot write it now.")


def test_a_claimed_shard_is_refused_naming_it_and_its_holder_and_the_refusal_keeps_nothing(root):
    with holder(lambda: claim_shards(root, [3], NAMES)) as pid:
        with pytest.raises(UsageError) as e:
            claim_shards(root, [1, 2, 3, 4], NAMES)
        assert str(e.value) == (
            f"{root}: {NAMES[3]} is being written by pid {pid}, another teacher-dump on this --out; two runs on "
            "one directory would corrupt it. Wait for it to finish, or use another --out; workers sharing a "
            "directory need --num-workers W and distinct --worker-index values.")
        # shards 1 and 2 were taken before the refusal and let go; 4 was never taken
        for i in (1, 2, 4):
            assert in_child(lambda i=i: claim_shards(root, [i], NAMES)) == OK, i
        assert in_child(lambda: claim_shards(root, [3], NAMES)) == REFUSED
        assert in_child(lambda: claim_shards(root, [2, 3], NAMES)) == REFUSED
    assert in_child(lambda: claim_shards(root, [3], NAMES)) == OK  # its holder has gone


def test_claimed_shards_are_held_until_release(root):
    claim_shards(root, [0, 5], NAMES)
    claim_shards(root, [0, 5], NAMES)  # a process never conflicts with itself (a rerun in-process)
    assert in_child(lambda: claim_shards(root, [5], NAMES)) == REFUSED
    assert in_child(lambda: claim_shards(root, [0], NAMES)) == REFUSED
    assert in_child(lambda: claim_shards(root, [1, 4, 6], NAMES)) == OK  # disjoint shards: side by side
    release(root)
    assert in_child(lambda: claim_shards(root, [0, 5], NAMES)) == OK


def test_release_without_a_root_drops_every_store_and_one_root_only_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    claim_shards(a, [0], NAMES)
    claim_shards(b, [0], NAMES)
    release(a)
    assert in_child(lambda: claim_shards(a, [0], NAMES)) == OK
    assert in_child(lambda: claim_shards(b, [0], NAMES)) == REFUSED
    claim_shards(a, [0], NAMES)
    release()
    assert in_child(lambda: claim_shards(a, [0], NAMES)) == OK
    assert in_child(lambda: claim_shards(b, [0], NAMES)) == OK
    release(a)  # nothing held: a no-op


def test_one_descriptor_per_store_however_it_is_named(root, tmp_path):
    """Closing a second descriptor of the lock file would drop every lock of the first: a store reached through
    a symlink or a relative path must reuse the one descriptor."""
    link = tmp_path / "link"
    link.symlink_to(root)
    fd = lock._fd(root)
    assert lock._fd(link) == fd and lock._fd(root / ".") == fd
    assert (root / ".lock").is_file() and (root / ".lock").stat().st_size == 0
    claim_shards(link, [2], NAMES)
    release(link)  # the same store: its one descriptor closed, its locks gone
    assert in_child(lambda: claim_shards(root, [2], NAMES)) == OK


def test_writer_pid_sees_a_process_holding_shards_and_nothing_else(root):
    assert writer_pid(root) is None
    claim_shards(root, [0], NAMES)
    assert writer_pid(root) is None  # this process's own shards are not "another writer"
    release(root)
    with holder(lambda: hold_run(root, exclusive=True)):
        assert writer_pid(root) is None  # the run lock is not a shard
    with holder(lambda: enter(manifest_lock(root))):
        assert writer_pid(root) is None  # nor is the manifest lock
    with holder(lambda: claim_shards(root, [7], NAMES)) as pid:
        assert writer_pid(root) == pid  # any shard, however far from the first
    with holder(lambda: claim_shards(root, [0], NAMES)) as pid:
        assert writer_pid(root) == pid
    assert writer_pid(root) is None  # its holder has gone


def test_the_manifest_lock_excludes_other_processes_and_is_let_go_even_on_an_error(root):
    with holder(lambda: enter(manifest_lock(root))) as pid:
        assert lock._try(lock._fd(root), lock.MANIFEST_BYTE, True) == (False, pid)
        # the manifest lock is its own byte: shards and the run lock stay free
        assert lock._try(lock._fd(root), lock.RUN_BYTE, True) == (True, None)
        assert lock._try(lock._fd(root), lock.SHARD_BYTE0, True) == (True, None)
    release(root)
    with manifest_lock(root):
        assert in_child(lambda: _no_wait_manifest(root)) == REFUSED
    assert in_child(lambda: _no_wait_manifest(root)) == OK
    with pytest.raises(RuntimeError), manifest_lock(root):
        raise RuntimeError("a failure while the manifest was being written")
    assert in_child(lambda: _no_wait_manifest(root)) == OK


def _no_wait_manifest(root: Path) -> None:
    ok, _ = lock._try(lock._fd(root), lock.MANIFEST_BYTE, True)
    if not ok:
        raise UsageError("the manifest lock is held")


def test_the_manifest_lock_waits_for_its_holder(root):
    """Blocking, not refusing: a worker updating the manifest waits milliseconds for another's update."""
    r, w = os.pipe()
    with holder(lambda: enter(manifest_lock(root))):
        pid = os.fork()
        if pid == 0:
            code = OTHER
            try:
                with manifest_lock(root):
                    os.write(w, b"got")
                code = OK
            finally:
                os._exit(code)
        os.set_blocking(r, False)
        time.sleep(0.3)
        with pytest.raises(BlockingIOError):
            os.read(r, 3)  # still waiting while the holder holds it
    # the holder let go: the waiter gets it
    os.set_blocking(r, True)
    assert os.read(r, 3) == b"got"
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == OK
    os.close(r), os.close(w)


def test_an_unknown_holder_is_named_as_such():
    assert lock._who(4242) == "pid 4242"
    assert lock._who(None) == lock._who(0) == "another process (pid unknown: another host?)"


def test_the_holder_is_unknown_when_the_lock_query_fails(root, monkeypatch):
    with holder(lambda: claim_shards(root, [1], NAMES)):
        real = fcntl.fcntl

        def failing(fd, cmd, arg=0):
            if cmd == fcntl.F_GETLK:
                raise OSError("F_GETLK not supported here")
            return real(fd, cmd, arg)

        monkeypatch.setattr(lock.fcntl, "fcntl", failing)
        with pytest.raises(UsageError) as e:
            claim_shards(root, [1], NAMES)
        assert "is being written by another process (pid unknown: another host?)" in str(e.value)
        assert writer_pid(root) is None


def test_a_refused_claim_lets_go_only_of_what_it_took(root):
    """The rollback unlocks exactly the shards this claim took: a worker's earlier shard (here 2, next to the
    rolled-back 1) stays its own."""
    claim_shards(root, [2], NAMES)
    with holder(lambda: claim_shards(root, [5], NAMES)):
        with pytest.raises(UsageError):
            claim_shards(root, [1, 5], NAMES)
    assert in_child(lambda: claim_shards(root, [2], NAMES)) == REFUSED
    assert in_child(lambda: claim_shards(root, [1], NAMES)) == OK


def test_the_refusal_names_the_holder_of_that_shard_not_of_its_neighbour(root):
    with holder(lambda: claim_shards(root, [4], NAMES)):  # the neighbour, locked first
        with holder(lambda: claim_shards(root, [3], NAMES)) as pid:
            with pytest.raises(UsageError) as e:
                claim_shards(root, [3], NAMES)
            assert f"{NAMES[3]} is being written by pid {pid}," in str(e.value)


def test_writer_pid_says_0_for_a_holder_whose_pid_the_lock_does_not_give(root, monkeypatch):
    """A lock held from another NFS client reports no pid: a live writer all the same."""
    real = fcntl.fcntl

    def remote_holder(fd, cmd, arg=0):
        if cmd == fcntl.F_GETLK:
            return lock.struct.pack(lock._FLOCK, fcntl.F_WRLCK, os.SEEK_SET, lock.SHARD_BYTE0, 1, 0)
        return real(fd, cmd, arg)

    monkeypatch.setattr(lock.fcntl, "fcntl", remote_holder)
    assert writer_pid(root) == 0


def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner(root):
    lock._fd(root)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((root / ".lock").stat().st_mode) == 0o644 & ~umask
