"""The installed `gedistill` command, run as users run it: a subprocess, exit code and message checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import MANIFEST
from pipeline.teacher import heap


def gedistill_exe() -> str:
    """The console script installed next to this interpreter (the venv's `gedistill`)."""
    exe = Path(sys.executable).parent / "gedistill"
    found = str(exe) if exe.exists() else shutil.which("gedistill")
    if not found:
        pytest.fail("the `gedistill` console script is not installed; run `pip install -e .`")
    return found


def run_gedistill(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1"}
    return subprocess.run([gedistill_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_installed_command_exits_nonzero_when_verify_finds_a_problem(tmp_path: Path):
    """Fails if `main` drops the code of `typer.Exit` (the installed command then exited 0 on a
    corrupted store, so `gedistill cache verify && train` trained on it)."""
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

    store = tmp_path / "s"
    run_dump(DumpConfig(shard_rows=3), load_inputs(*make_inputs(tmp_path / "in")), FakeBackend(), FAKE_TEACHER, store)
    ok = run_gedistill("cache", "verify", str(store))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    shard = sorted(store.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_gedistill("cache", "verify", str(store))
    assert bad.returncode != 0
    assert shard.name in bad.stdout + bad.stderr


def test_installed_command_usage_error_exit_2(tmp_path: Path):
    """A user mistake (not a store) exits 2 with a message that says what to do, never a traceback."""
    r = run_gedistill("cache", "info", str(tmp_path))
    assert r.returncode == 2
    assert MANIFEST in r.stderr and "Traceback" not in r.stderr


# --- every command, as users run it: a success each (usage errors: tests/test_bad_inputs.py) ------

def _flat(text: str) -> str:
    """Rich wraps long lines at the terminal width; compare with whitespace collapsed."""
    return " ".join(text.split())


def _fake_store(prepared: Path, candidates: Path, out: Path, mode: str = "first-token") -> Path:
    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend

    run_dump(DumpConfig(shard_rows=32, mode=mode), load_inputs(prepared, candidates), FakeBackend(), FAKE_TEACHER, out)
    return out


TINY_STUDENT = ("--hidden", "16", "--max-len", "8", "--epochs", "2", "--threads", "1")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder run like the README: `gedistill prepare`, `student-train`, `retrieve` with their
    default paths (data/...), from that folder as the working directory; then a teacher store of the
    fake teacher (the real one is tested under the `teacher` marker)."""
    from tests.conftest import synthetic_interactions

    import polars as pl

    root = tmp_path_factory.mktemp("project")
    synthetic_interactions().write_csv(root / "inter.csv")
    pl.DataFrame({"item_id": [f"i{i}" for i in range(40)], "title": [f"Movie {i}" for i in range(40)]}).write_csv(
        root / "items.csv")
    r = run_gedistill("prepare", "--interactions", "inter.csv", "--items", "items.csv", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "users" in r.stdout and "60" in r.stdout and (root / "data/prepared/summary.json").is_file()
    r = run_gedistill("student-train", *TINY_STUDENT, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "baseline" in r.stdout and "ndcg@10" in r.stdout
    assert (root / "data/students/baseline/config.json").is_file() and (root / "data/metrics/baseline.json").is_file()
    r = run_gedistill("retrieve", "--k", "5", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "60 samples, K=5" in r.stdout and (root / "data/candidates/candidates.parquet").is_file()
    _fake_store(root / "data/prepared", root / "data/candidates/candidates.parquet", root / "data/teacher")
    return root


def test_prepare_student_train_retrieve_succeed(project: Path):
    """The fixture ran them through the installed command; their outputs are readable by the next stage."""
    from pipeline.data.candidates import read_candidates

    df, meta = read_candidates(project / "data/candidates/candidates.parquet")
    assert df.height == 60 and meta["k"] == 5
    history = json.loads((project / "data/students/baseline/history.json").read_text())
    assert len(history) == 2


def test_distill_and_evaluate_succeed(project: Path):
    r = run_gedistill("student-train", "--teacher-cache", "data/teacher", *TINY_STUDENT, cwd=project)
    assert r.returncode == 0, r.stderr
    assert "distilled" in r.stdout and (project / "data/students/distilled/config.json").is_file()
    r = run_gedistill("evaluate", "--n-boot", "100", "--teacher-cache", "data/teacher", "--threads", "1", cwd=project)
    assert r.returncode == 0, r.stderr
    out = _flat(r.stdout)
    assert "distilled vs baseline" in out and "NDCG@10:" in out
    m = json.loads((project / "data/metrics/evaluate.json").read_text())
    assert set(m["test"]) == {"baseline", "distilled"} and m["teacher"]["samples"] == 60
    assert (project / "data/plots/comparison.png").is_file()


def test_cache_info_verify_merge_succeed(project: Path, tmp_path: Path):
    r = run_gedistill("cache", "info", "data/teacher", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "60" in r.stdout and "fake" in r.stdout
    r = run_gedistill("cache", "verify", "data/teacher", cwd=project)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    merged = tmp_path / "merged"
    r = run_gedistill("cache", "merge", str(merged), "data/teacher", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "merged 1 source(s)" in _flat(r.stdout) and (merged / MANIFEST).is_file()


def test_store_from_other_candidates_trains_without_an_implicit_candidates_check(project: Path, tmp_path: Path):
    """Issue 12 hole 8, run from the project folder where data/candidates/candidates.parquet exists.

    A store made from another candidates file trains when --candidates is not given: fails if the
    command checks the store against the default path the user never named (it refused, 'made from
    other data'). Given explicitly, the wrong file is refused (exit 2, naming the fingerprints) and
    the right one accepted."""
    other = tmp_path / "other.parquet"
    r = run_gedistill("retrieve", "--k", "5", "--samples-per-user", "2", "--out", str(other), cwd=project)
    assert r.returncode == 0, r.stderr
    store = _fake_store(project / "data/prepared", other, tmp_path / "store")
    common = ("student-train", "--teacher-cache", str(store), *TINY_STUDENT)
    ok = run_gedistill(*common, "--out", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.json"), cwd=project)
    assert ok.returncode == 0, ok.stderr
    bad = run_gedistill(*common, "--candidates", "data/candidates/candidates.parquet", "--out", str(tmp_path / "b"),
                        "--metrics", str(tmp_path / "b.json"), cwd=project)
    assert bad.returncode == 2 and "candidates fingerprint" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b" / "config.json").exists()
    right = run_gedistill(*common, "--candidates", str(other), "--out", str(tmp_path / "c"),
                          "--metrics", str(tmp_path / "c.json"), cwd=project)
    assert right.returncode == 0, right.stderr


@pytest.mark.teacher
def test_teacher_dump_with_the_real_teacher(project: Path, tmp_path: Path):
    """The installed command loads the embedded teacher and writes a verified store (4 samples)."""
    out = tmp_path / "store"
    r = run_gedistill("teacher-dump", "--out", str(out), "--limit", "4", "--shard-rows", "2", "--history-len", "3",
                      "--dtype", "float32", "--threads", "1", cwd=project)
    assert r.returncode == 0, r.stderr
    out_text = _flat(r.stdout)
    assert "2 shard(s) written" in out_text and "store complete" in out_text
    if heap._glibc() is not None:  # the CPU teacher keeps glibc's heap (pipeline/teacher/heap.py)
        assert "heap kept between batches" in _flat(r.stderr)
    v = run_gedistill("cache", "verify", str(out))
    assert v.returncode == 0 and "OK" in v.stdout
