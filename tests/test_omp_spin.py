"""Issue 10: gedistill's processes shorten libgomp's spin before an idle OpenMP worker sleeps (pipeline/omp.py).

With libgomp's default (300,000 turns) a 2-thread teacher-dump beside one busy process took 1.11x the time of
30,000 turns, and the idle machine saw no difference (BENCHMARKS.md, "OpenMP workers spin less"). libgomp reads
its environment once, when torch loads it, so the installed command sets GOMP_SPINCOUNT before any stage module
imports torch; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. What libgomp really uses is read from its own
report (OMP_DISPLAY_ENV=VERBOSE prints its settings on stderr when it starts).

Caught (each break tried, seen failing):
- the setting made after the stage imports (torch already loaded): libgomp reports 300000;
- a user's GOMP_SPINCOUNT or OMP_WAIT_POLICY overwritten: libgomp reports 30000 instead of theirs;
- the variable left in the environment for children (vLLM's engine, Ray's workers): the child check sees it;
- shorten_spin setting it although torch is loaded (too late to take effect, and misleading in the log).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline import omp
from tests.test_entrypoint import gedistill_exe


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in omp.USER_SETTINGS}
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", "GEDISTILL_NO_PROGRESS": "1", **extra}


def _libgomp_reports(*args: str, **extra: str) -> tuple[dict[str, str], subprocess.CompletedProcess]:
    r = subprocess.run([gedistill_exe(), *args], capture_output=True, text=True, env=_env(**extra), timeout=300)
    assert r.returncode == 0, r.stderr
    got = dict(re.findall(r"^\s+(GOMP_SPINCOUNT|OMP_WAIT_POLICY) = '([^']*)'", r.stderr, re.M))
    assert set(got) == {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"}, f"libgomp printed no settings:\n{r.stderr[-2000:]}"
    return got, r


def test_the_installed_command_shortens_the_spin():
    got, _ = _libgomp_reports("student-train", "--help")
    assert got["GOMP_SPINCOUNT"] == str(omp.SPIN_COUNT)
    assert got["OMP_WAIT_POLICY"] == "PASSIVE"  # libgomp's name for "spin a while, then sleep"


def test_the_decision_is_logged_with_verbose():
    _, r = _libgomp_reports("-v", "prepare", "--help")
    assert f"idle OpenMP workers spin {omp.SPIN_COUNT} turns" in r.stderr


@pytest.mark.parametrize("extra, key, want", [
    ({"GOMP_SPINCOUNT": "777"}, "GOMP_SPINCOUNT", "777"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY", "ACTIVE"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "GOMP_SPINCOUNT", "0"),
])
def test_a_users_own_setting_wins(extra, key, want):
    got, r = _libgomp_reports("-v", "prepare", "--help", **extra)
    assert got[key] == want
    assert got["GOMP_SPINCOUNT"] != str(omp.SPIN_COUNT)
    assert "OpenMP wait settings from the environment" in r.stderr


def test_children_start_from_the_users_environment():
    """The command's own process keeps the short spin; what it starts (vLLM's engine, Ray's workers) does not
    inherit the variable, since only the command's process was measured."""
    code = ("import os, sys; import stages.cli as c; import torch; "
            "print(c.SPIN_SET, 'torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "None"]
    assert f"GOMP_SPINCOUNT = '{omp.SPIN_COUNT}'" in r.stderr  # and yet libgomp took it


def test_shorten_spin_decides(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as at the command line's start (restored afterwards)
    env: dict[str, str] = {}
    assert omp.shorten_spin(env)[0] is True
    assert env == {"GOMP_SPINCOUNT": str(omp.SPIN_COUNT)}
    for user in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "active"}):
        env = dict(user)
        changed, why = omp.shorten_spin(env)
        assert (changed, env) == (False, user)
        assert next(iter(user)) in why


def test_shorten_spin_leaves_a_loaded_torch_alone():
    import torch  # noqa: F401

    env: dict[str, str] = {}
    changed, why = omp.shorten_spin(env)
    assert (changed, env) == (False, {})
    assert "torch was loaded" in why
