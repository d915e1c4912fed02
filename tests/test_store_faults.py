"""A rerun finishes the store whatever state a crash left it in; merge launders nothing; two writers
on one directory cannot corrupt it (fake teacher; kills are real SIGKILLs of forked or spawned processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UsageError
from pipeline.store import MANIFEST, open_store, sha256_file
from pipeline.store.check import verify_store
from pipeline.store.faults import ENV, POINTS
from pipeline.store.merge import merge_stores
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

ROOT = Path(__file__).resolve().parents[1]
CFG = DumpConfig(shard_rows=3)  # 10 samples -> shards of 3, 3, 3, 1
SHARDS = [f"part-0000{i}-of-00004.parquet" for i in range(4)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    prepared, cands = make_inputs(root / "in")
    inputs = load_inputs(prepared, cands)
    run_dump(CFG, inputs, FakeBackend(), FAKE_TEACHER, root / "ref")
    return root, inputs


def rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / n) for n in SHARDS]).sort("sample_id")


def dump(inputs, out: Path, cfg: DumpConfig = CFG):
    return run_dump(cfg, inputs, FakeBackend(), FAKE_TEACHER, out)


def assert_whole(out: Path, ref: Path) -> None:
    """Same rows as an uninterrupted run, none lost or duplicated, verify clean, no temporary file left."""
    assert rows(out).equals(rows(ref))
    assert verify_store(out) == []
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) == []
    assert open_store(out).n_rows == 10


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def data_offset(path: Path, column: str) -> int:
    """The middle of a column chunk's pages in shard `path` (from the Parquet metadata)."""
    md = pq.read_metadata(path)
    rg = md.row_group(0)
    col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] == column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    return start + col.total_compressed_size // 2


def test_rerun_after_a_torn_shard_that_is_not_the_first_pending(world, tmp_path):
    """Fails if the manifest writer reads every shard's footer unguarded: the rerun recomputes shard 0,
    rewrites the manifest, and crashed (ArrowInvalid) on the torn shard 2 before recomputing it."""
    root, inputs = world
    out = tmp_path / "s"
    dump(inputs, out)
    (out / SHARDS[0]).unlink()
    os.truncate(out / SHARDS[2], (out / SHARDS[2]).stat().st_size // 2)
    report = dump(inputs, out)
    assert report.shards_written == 2 and report.complete
    assert_whole(out, root / "ref")


def _zero_manifest(out):
    (out / MANIFEST).write_bytes(b"")


def _torn_manifest(out):
    os.truncate(out / MANIFEST, (out / MANIFEST).stat().st_size // 2)


def _stale_temps(out):
    (out / f".{SHARDS[1]}.tmp-99999").write_bytes(b"PAR1 half")
    (out / f".{MANIFEST}.tmp-99999").write_text('{"half": ')


def _listed_but_gone(out):
    (out / SHARDS[1]).unlink()


def _torn_last(out):
    os.truncate(out / SHARDS[3], 100)


def _unlisted_and_bitflipped(out):
    """No manifest (a crash before its first write), and a data page of shard 2 damaged meanwhile."""
    (out / MANIFEST).unlink()
    flip(out / SHARDS[2], data_offset(out / SHARDS[2], "h_dec"))


@pytest.mark.parametrize("damage", [_zero_manifest, _torn_manifest, _stale_temps, _listed_but_gone, _torn_last,
                                    _unlisted_and_bitflipped], ids=lambda f: f.__name__.strip("_"))
def test_rerun_finishes_the_store_from_any_crash_state(world, tmp_path, damage):
    """Fails if a rerun crashes on a zero-length or torn manifest (JSONDecodeError), leaves stale
    temporary files in the store, or trusts an unlisted shard whose pages fail their checksums."""
    root, inputs = world
    out = tmp_path / "s"
    dump(inputs, out)
    damage(out)
    assert dump(inputs, out).complete
    assert_whole(out, root / "ref")


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_fault_point_then_rerun(world, tmp_path, point):
    """Fails if a SIGKILL at any point of a shard or manifest write (GEDISTILL_FAULT, on the 2nd time the
    point is reached) leaves a state that the rerun cannot finish into the uninterrupted run's rows."""
    root, inputs = world
    out = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # the child: a real process, killed by the hook
        try:
            os.environ[ENV] = f"{point}:2"
            dump(inputs, out)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point} was never reached"
    # mid-/torn- points cut the file just written to half (the 2nd shard is shard 1): the rerun meets a real tear
    cut = {"mid-shard-write": out / f".{SHARDS[1]}.tmp-{pid}", "torn-shard": out / SHARDS[1],
           "mid-manifest-write": out / f".{MANIFEST}.tmp-{pid}", "torn-manifest": out / MANIFEST}.get(point)
    if point in ("mid-shard-write", "torn-shard"):
        assert cut.stat().st_size == (root / "ref" / SHARDS[1]).stat().st_size // 2, f"{point} did not cut {cut.name}"
    elif cut is not None:
        with pytest.raises(ValueError):
            json.loads(cut.read_text(encoding="utf-8"))
    assert dump(inputs, out).complete
    assert_whole(out, root / "ref")


def _workers(inputs, root: Path) -> list[Path]:
    parts = []
    for i in range(2):
        dump(inputs, root / f"w{i}", DumpConfig(shard_rows=3, num_workers=2, worker_index=i))
        parts.append(root / f"w{i}")
    return parts


def test_merge_refuses_a_source_shard_corrupted_after_its_worker_finished(world, tmp_path):
    """Fails if merge hashes the source shards afresh: the flipped shard was laundered into a new
    manifest that `cache verify` then passed."""
    _, inputs = world
    parts = _workers(inputs, tmp_path)
    flip(parts[1] / SHARDS[1])
    with pytest.raises(UsageError, match=rf"w1/{SHARDS[1]}: sha256 differs"):
        merge_stores(tmp_path / "merged", parts)
    assert not (tmp_path / "merged" / SHARDS[1]).exists()


def test_merge_refuses_a_shard_its_source_manifest_does_not_list(world, tmp_path):
    """Fails if a shard file present in a source directory but absent from that source's manifest
    (a crash before the manifest write, or a file dropped in by hand) is merged on trust."""
    root, inputs = world
    parts = _workers(inputs, tmp_path)
    m = json.loads((parts[0] / MANIFEST).read_text())
    m["shards"] = [s for s in m["shards"] if s["name"] != SHARDS[2]]
    m["complete"] = False
    (parts[0] / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UsageError, match=rf"w0/{SHARDS[2]}: present but not listed"):
        merge_stores(tmp_path / "merged", parts)
    dump(inputs, parts[0], DumpConfig(shard_rows=3, num_workers=2, worker_index=0))  # the worker's rerun lists it
    merge_stores(tmp_path / "merged", parts)
    assert_whole(tmp_path / "merged", root / "ref")
    assert [s["sha256"] for s in json.loads((tmp_path / "merged" / MANIFEST).read_text())["shards"]] == \
        [sha256_file(root / "ref" / n) for n in SHARDS]


# A real process running run_dump with a slow fake teacher; both start dumping at the same moment.
SCRIPT = """
import json, sys, time
from pathlib import Path
from pipeline.errors import UsageError
from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend
inp, out, workers, index, go = sys.argv[1:6]

class Slow(FakeBackend):
    def run(self, *a, **k):
        time.sleep(0.3)
        return super().run(*a, **k)

inputs = load_inputs(Path(inp) / "prepared", Path(inp) / "candidates" / "candidates.parquet")
Path(go + "." + index).touch()
while not Path(go).exists():
    time.sleep(0.01)
try:
    r = run_dump(DumpConfig(shard_rows=3, num_workers=int(workers), worker_index=int(index)), inputs, Slow(),
                 FAKE_TEACHER, Path(out))
except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"complete": r.complete, "written": r.shards_written}))
"""


def _race(root: Path, out: Path, args: list[tuple[int, int]]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    go = root / f"go-{out.name}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(root / "in"), str(out), str(w), str(i), str(go)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, i in args]
    deadline = time.time() + 240
    while not all(Path(f"{go}.{i}").exists() for _, i in args):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a racer died before the start"
        time.sleep(0.05)
    go.touch()
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        cp = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        cp.pid = p.pid
        done.append(cp)
    return done


def test_two_dumps_on_one_directory_one_is_refused_naming_the_other(world):
    """Fails without the store lock: both processes wrote the same shards, each deleting the other's
    temporary file as stale, and one crashed (FileNotFoundError) or both 'succeeded' on a shared store."""
    root, _ = world
    a, b = _race(root, root / "race", [(1, 0), (1, 0)])
    codes = sorted((a.returncode, b.returncode))
    assert codes == [0, 2], (a.stderr[-2000:], b.stderr[-2000:])
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    # the refusal names the holder: the winner's pid
    assert "is being written by pid" in loser.stderr and "Traceback" not in loser.stderr
    assert int(loser.stderr.split("is being written by pid ")[1].split(",")[0]) == winner.pid
    assert json.loads(winner.stdout)["complete"]
    assert_whole(root / "race", root / "ref")


def test_two_workers_share_one_directory_at_once(world):
    """Workers with distinct --worker-index run side by side in one directory; the manifest, rewritten
    by both after every shard under the manifest lock, ends complete: no shard of either is lost."""
    root, _ = world
    a, b = _race(root, root / "shared", [(2, 0), (2, 1)])
    assert (a.returncode, b.returncode) == (0, 0), (a.stderr[-2000:], b.stderr[-2000:])
    assert json.loads(a.stdout)["complete"] or json.loads(b.stdout)["complete"]
    assert json.loads((root / "shared" / MANIFEST).read_text())["complete"]
    assert_whole(root / "shared", root / "ref")


def test_an_unwritable_out_is_a_usage_error(world, tmp_path):
    """Fails if a read-only parent or a file in place of --out surfaces as a PermissionError or
    FileExistsError traceback instead of a message that says to choose a writable directory."""
    _, inputs = world
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UsageError) as e:
        dump(inputs, tmp_path / "file")
    assert str(e.value) == f"cannot write the teacher store at {tmp_path / 'file'} (File exists); choose a writable " \
                           "--out directory"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere: then only the case above applies
            with pytest.raises(UsageError, match="choose a writable --out"):
                dump(inputs, ro / "store")
    finally:
        ro.chmod(0o700)
