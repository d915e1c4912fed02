"""`gedistill teacher-dump --ray`: the installed command on a local 2-CPU Ray cluster, the real embedded teacher.

One cluster for the module (started here, `num_cpus=2`, no dashboard); every command joins it by address.
The reference is a single-process run with the same settings (float32, 1 thread): the Ray store must be
the same bytes, shard for shard and manifest included, also after an actor is killed mid-run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_helpers import start_local_ray
from tests.teacher_fixtures import make_inputs

pytestmark = [pytest.mark.teacher, pytest.mark.slow]
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
GEDISTILL = Path(sys.executable).with_name("gedistill")
# 12 samples in 6 shards of 2: shards are small, so both actors hold work when one is killed
SETTINGS = ["--dtype", "float32", "--threads", "1", "--shard-rows", "2", "--history-len", "3"]


def gedistill(*args: str, timeout: float = 300, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if progress:
        del env["GEDISTILL_NO_PROGRESS"]
    return subprocess.run([str(GEDISTILL), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def flat(text: str) -> str:
    return " ".join(text.split())


def store_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name == "manifest.json" or p.suffix == ".parquet"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    prepared, cands = make_inputs(root / "in", n_users=4, per_user=3)
    return root, ["--prepared", str(prepared), "--candidates", str(cands)]


@pytest.fixture(scope="module")
def world(inputs):
    root, io = inputs
    ref = gedistill("teacher-dump", *io, "--out", str(root / "ref"), *SETTINGS)
    assert ref.returncode == 0, ref.stderr
    assert "6 shard(s) written" in flat(ref.stdout)
    return root, io, store_bytes(root / "ref")


@pytest.fixture(scope="module")
def cluster():
    yield start_local_ray().address_info["gcs_address"]
    ray.shutdown()


def test_ray_store_is_the_single_process_store(world, cluster):
    """Fails if the Ray run's shards or manifest differ from a single-process run by one byte: shards
    computed in other batches, rows in another order, a fingerprint or a manifest field of its own.
    Seen failing with the actors loading the teacher at --batch-size 1 (h_dec bits change with the
    batch's padding; batch size is not in the fingerprint)."""
    root, io, ref = world
    r = gedistill("teacher-dump", *io, "--out", str(root / "a"), *SETTINGS, "--ray", cluster, "--ray-actors", "2")
    assert r.returncode == 0, r.stderr
    out = flat(r.stdout)
    assert "6 shard(s) written" in out and "store complete" in out and "ray: 2 actor(s)" in out
    assert store_bytes(root / "a") == ref
    v = gedistill("cache", "verify", str(root / "a"))
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr


def test_ray_rerun_computes_only_missing_shards(world, cluster, tmp_path):
    """Fails if a rerun recomputes complete shards or leaves the deleted one missing; the result is
    again the single-process store, or if the driver's progress bar does not count the shards and
    samples. Seen failing with the driver dispatching every shard instead of StoreWriter.pending's
    ('6 shard(s) written')."""
    root, io, ref = world
    out = tmp_path / "s"
    out.mkdir()
    for name, data in ref.items():
        (out / name).write_bytes(data)
    (out / "part-00003-of-00006.parquet").unlink()
    r = gedistill("teacher-dump", *io, "--out", str(out), *SETTINGS, "--ray", cluster, "--ray-actors", "1",
                  progress=True)
    assert r.returncode == 0, r.stderr
    assert "1 shard(s) written, 5 already complete" in flat(r.stdout)
    # the driver's one bar, as rich leaves it when the run ends: samples, shards, rate
    assert re.search(r"teacher-dump \(first-token, ray\).* 2/2 shards 1/1 [0-9.]+ samples/s", flat(r.stdout)), r.stdout
    assert store_bytes(out) == ref


def test_actor_killed_mid_run_is_restarted_and_the_store_completes(world, cluster, tmp_path):
    """Kill one of two actors (ray.kill, no_restart=False) once the first shard is written, while
    both hold shards. Fails without max_restarts (the run dies: 'actor died') or without
    max_task_retries (its in-flight shard fails), if the driver does not notice the restart, or if
    the store then differs from the single-process one or does not verify. Seen failing with
    max_restarts=0 ('its actor died ... killed by ray.kill') and with max_task_retries=0 ('The actor
    was restarted. The task may or may not have been executed')."""
    root, io, ref = world
    out = tmp_path / "k"
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(GEDISTILL), "teacher-dump", *io, "--out", str(out), *SETTINGS, "--ray", cluster,
                             "--ray-actors", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard written in 240 s"
            time.sleep(0.2)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("gedistill-teacher-dump-")]
        assert len(names) == 2, names
        victim = ray.get_actor(sorted(names)[1], namespace="gedistill")
        ray.kill(victim, no_restart=False)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert len(list(out.glob("part-*.parquet"))) == 6 and "1 actor restart(s)" in flat(stdout), stdout
    assert store_bytes(out) == ref
    v = gedistill("cache", "verify", str(out))
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr


@pytest.mark.parametrize("args, says", [
    (["--ray", "127.0.0.1:9"], ["no Ray cluster answers at 127.0.0.1:9", "ray start --head"]),
    (["--ray", "--num-workers", "2", "--worker-index", "1"], ["drop --num-workers/--worker-index"]),
    (["--ray-actors", "2"], ["--ray-actors apply to --ray only"]),
    (["10.0.0.1:6379"], ["a cluster address goes with --ray", "--ray 10.0.0.1:6379"]),
], ids=["unreachable-address", "with-num-workers", "ray-option-without-ray", "address-without-ray"])
def test_bad_ray_input_exits_2_and_says_what_to_do(inputs, tmp_path, args, says):
    """Fails if a bad --ray combination runs, hangs (ray.init retries an unreachable address for about
    a minute: the timeout here is 60 s) or dies with a traceback instead of exit 2 and a fix. Seen
    failing, each case, with its check removed: the unreachable address hung in ray.init past 60 s,
    the other three ran and wrote a store."""
    _, io = inputs
    r = gedistill("teacher-dump", *io, "--out", str(tmp_path / "o"), *SETTINGS, *args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    err = flat(r.stderr)
    assert all(s in err for s in says) and "Traceback" not in r.stderr, err


def test_more_actors_than_the_cluster_holds_exits_2(inputs, cluster, tmp_path):
    """Fails if 3 one-thread actors are created on a 2-CPU cluster: the third would wait forever (seen
    without the check: the command hung past the 120 s timeout)."""
    _, io = inputs
    r = gedistill("teacher-dump", *io, "--out", str(tmp_path / "o"), *SETTINGS, "--ray", cluster,
                  "--ray-actors", "3", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = flat(r.stderr)
    assert "does not fit the Ray cluster (2 CPU(s)" in err and "at most 2 actor(s)" in err, err
