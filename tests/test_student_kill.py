"""Kill -9 during `gedistill student-train`, the fast version of benchmarks/campaign_student_kill.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _campaign():
    spec = importlib.util.spec_from_file_location("campaign_student_kill", REPO / "benchmarks" / "campaign_student_kill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_kill_during_student_train_then_rerun(tmp_path):
    """Two kills of the installed command over a stale complete checkpoint of another run: one as the
    temporary weights file appears (the checkpoint write; polled, so it may land just after), one as
    the distilled run's report appears (after training, before the checkpoint is replaced).
    Fails if a killed run leaves a folder that loads as a checkpoint mixing two runs, or a rerun
    does not end with exactly the uninterrupted run's checkpoint and metrics."""
    camp = _campaign()
    camp.IN_PROCESS = True  # reference and rerun in this interpreter; the killed runs are the installed command
    result = camp.campaign(tmp_path, [("baseline", "weights"), ("distilled", "report")], epochs=3, repeats=1)
    assert result["trials"][1]["event"] == "killed at ranks.parquet", result["trials"][1]
    for row in result["trials"]:
        assert row["state_ok"], row
        assert row["rerun_exit"] == 0 and row["rerun_loads"] and row["rerun_equals_reference"], row
