"""The installed `gedistill` command, run as users run it: a subprocess, exit code and message checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import MANIFEST


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
