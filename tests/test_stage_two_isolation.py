"""Stage two runs from a teacher store alone: `student-train --teacher-cache` never imports an LLM stack (transformers, vllm, peft) or Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.prepared import load_prepared
from tests.distill_helpers import cluster_teacher_rows, cluster_world, write_teacher_store, write_world

ROOT = Path(__file__).resolve().parents[1]

# Runs the real CLI in-process, then reports which forbidden modules got imported.
WRAPPER = """
import json, sys
from stages.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'vllm', 'ray', 'peft'))
print('STAGE2-REPORT ' + json.dumps({'code': code, 'bad': bad}))
"""


def _run(args: list[str], cwd: Path) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**os.environ, "GEDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STAGE2-REPORT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1].split(" ", 1)[1]), proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    world = cluster_world(n_users=40, length=8, n_items=60, n_clusters=6, seed=3)
    write_world(root / "prepared", world)
    fp = load_prepared(root / "prepared").fingerprint
    write_teacher_store(root / "store", cluster_teacher_rows(world, k=8, same_cluster=2, last_m=2, width=24),
                        prepared_fingerprint=fp, shard_rows=32)
    write_teacher_store(root / "store-2", cluster_teacher_rows(world, k=8, same_cluster=2, last_m=4, width=24, seed=7),
                        prepared_fingerprint=fp, shard_rows=32)
    write_teacher_store(root / "other-store", cluster_teacher_rows(world, k=8, same_cluster=2, last_m=2, width=24),
                        prepared_fingerprint="0" * 64, shard_rows=32)
    return root


COMMON = ["--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "8", "--epochs", "2",
          "--batch-size", "16", "--threads", "1", "--teacher-batch-size", "16", "--buffer-rows", "64"]


def test_student_train_from_the_store_never_imports_an_llm_stack(tiny):
    report, proc = _run(["student-train", "--prepared", str(tiny / "prepared"), "--teacher-cache", str(tiny / "store"),
                         "--teacher-cache", str(tiny / "store-2"), "--out", str(tiny / "students" / "distilled"), "--metrics", str(tiny / "metrics" / "distilled.json"),
                         "--w-rec", "0", "--emb-loss", "mse", *COMMON], tiny)
    assert report["code"] == 0, proc.stderr[-3000:]
    assert report["bad"] == [], f"stage two imported {report['bad']}"
    metrics = json.loads((tiny / "metrics" / "distilled.json").read_text())
    assert metrics["run"] == "distilled" and 0.0 <= metrics["test"]["ndcg@10"] <= 1.0
    history = json.loads((tiny / "students" / "distilled" / "history.json").read_text())
    # the collapse check is logged every epoch, and w_rec=0 trains no next-item loss
    for row in history:
        assert {"u_norm", "proj_norm", "l_emb", "l_rank"} <= row.keys()
        assert "loss_rec" not in row
    config = json.loads((tiny / "students" / "distilled" / "config.json").read_text())
    assert config["distill"]["emb_loss"] == "mse" and config["train"]["w_rec"] == 0.0
    assert config["teacher_cache"] == [str(tiny / "store"), str(tiny / "store-2")]  # two stores, trained together


def test_a_store_from_other_data_is_refused_with_the_difference_named(tiny):
    report, proc = _run(["student-train", "--prepared", str(tiny / "prepared"), "--teacher-cache", str(tiny / "other-store"),
                         "--out", str(tiny / "students" / "x"), *COMMON], tiny)
    assert report["code"] == 2
    assert "prepared-data fingerprint" in proc.stderr and "other-store" in proc.stderr
    assert not (tiny / "students" / "x").exists()
