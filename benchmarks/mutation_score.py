"""Mutation score per core module with mutmut 3 (make mutate; results in docs/MUTATION.md).

Each module runs in its own fresh copy of the project under build/mutate/<module>/, so that
  - the score comes from the committed code (--source head, the default: `git archive HEAD`),
    not from whatever is half-edited in the working tree (--source worktree tests that instead);
  - mutmut 3 mutates that one file and runs only the tests listed for it: its stats pass runs the
    selected tests once with tracing, then each mutant reruns only the tests that reached its function.
mutmut copies incrementally (an existing file in mutants/ is never refreshed), so every run starts
from an empty directory.

Usage:
    python benchmarks/mutation_score.py [--source head|worktree] [--max-children 1] [MODULE ...]
    python benchmarks/mutation_score.py --list
Writes build/mutate/scores.json (merged across runs), prints one line per module and the survivors;
build/mutate/<module>/survivors.diff holds each survivor's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutate"
SCORES = WORK / "scores.json"

# module -> (file(s) mutated, space-separated; test files run against them). The store's format, reader and
# merge share one run (one stats pass) and are scored file by file. The tests are the ones that exercise the module
# directly; end-to-end tests through a subprocess cannot see an in-process mutant, so they are left out.
# Two store tests spend 30 and 60 s in subprocesses of the installed command (which runs the unmutated
# code): deselected, or every writer mutant would rerun them.
_STORE_TESTS = ["tests/test_store.py", "tests/test_store_corruption.py", "tests/test_mut_store.py",
                "tests/test_store_faults.py", "tests/test_mut_store_writer.py", "tests/test_mut_store_check.py",
                "--deselect=tests/test_store.py::test_store_reader_imports_no_llm_stack",
                "--deselect=tests/test_store_corruption.py::test_installed_cache_verify_and_merge_exit_2_naming_the_file"]
MODULES: dict[str, tuple[str, list[str]]] = {
    "metrics": ("pipeline/evaluation/metrics.py", ["tests/test_metrics.py", "tests/test_mut_metrics.py"]),
    "stats": ("pipeline/evaluation/stats.py", ["tests/test_stats.py", "tests/test_mut_stats.py"]),
    "losses_distill": ("pipeline/student/losses_distill.py",
                       ["tests/test_distill.py", "tests/test_distill_targets.py", "tests/test_mut_losses.py"]),
    "distill": ("pipeline/student/distill.py",
                ["tests/test_distill.py", "tests/test_distill_targets.py", "tests/test_mut_distill.py"]),
    # The store, in three runs with the same tests: the writer and the verifier (about 520 mutants each, 13
    # minutes each on an idle 2-core machine) each alone, the format, reader and merge together.
    # test_store_faults's crash tests fork the test process (the child runs the mutated code and is SIGKILLed
    # at a fault point), so they do see a mutant; only its two race tests start fresh interpreters, which
    # mutmut cannot trace, and are never selected for a mutant.
    "store_writer": ("pipeline/store/__init__.py", _STORE_TESTS),
    "store_check": ("pipeline/store/check.py", _STORE_TESTS),
    "store": ("pipeline/store/format.py pipeline/store/read.py pipeline/store/merge.py", _STORE_TESTS),
    "prompt": ("pipeline/teacher/prompt.py", ["tests/test_teacher_prompt.py", "tests/test_mut_prompt.py"]),
    "parse": ("pipeline/teacher/parse.py", ["tests/test_teacher_parse.py", "tests/test_mut_parse.py",
                                            "tests/test_teacher_generate.py::test_generation_status_order"]),
    "identifiers": ("pipeline/teacher/identifiers.py",
                    ["tests/test_teacher_prompt.py", "tests/test_mut_identifiers.py"]),
    # test_cli_foundation's end-to-end test trains a student for every mutant it reaches: only its
    # direct selection test runs here; test_mut_candidates checks top_k and the file without training.
    "candidates": ("pipeline/data/candidates.py", ["tests/test_cli_foundation.py::test_sample_selection_last_positions_and_skip",
                                              "tests/test_mut_candidates.py"]),
    "sequences": ("pipeline/data/sequences.py", ["tests/test_sasrec.py", "tests/test_mut_sequences.py"]),
    "prepare": ("pipeline/data/prepare.py", ["tests/test_prepare.py", "tests/test_mut_prepare.py"]),
    # Stage two's reader of the store: what every distilled student trains on.
    "teacher_stream": ("pipeline/student/teacher_stream.py",
                       ["tests/test_distill.py", "tests/test_perf_stream.py", "tests/test_status_filters.py",
                        "tests/test_mut_teacher_stream.py"]),
    # Who may write a store at once. The race tests of test_store_faults start fresh interpreters (unseen);
    # its crash tests and the writer's tests fork, so their children run the mutant.
    "store_lock": ("pipeline/store/lock.py", [*_STORE_TESTS, "tests/test_mut_store_lock.py"]),
    # The teacher's own quality on its candidates (evaluate's teacher report).
    "teacher_quality": ("pipeline/evaluation/teacher_quality.py",
                        ["tests/test_evaluate.py::test_teacher_quality_on_hand_made_samples", "tests/test_status_filters.py",
                         "tests/test_teacher_generate.py::test_teacher_report_counts_no_decision_and_cut_rows",
                         "tests/test_mut_teacher_quality.py"]),
    # Student checkpoints (a kill at any point leaves none loadable as complete) and the prepared-data store.
    "checkpoint": ("pipeline/student/checkpoint.py", ["tests/test_checkpoint.py", "tests/test_mut_checkpoint.py"]),
    "prepared": ("pipeline/data/prepared.py", ["tests/test_prepare.py", "tests/test_mut_prepare.py",
                                              "tests/test_mut_prepared.py"]),
    # The student itself: the encoder, its masks, dropout and attention ops (same bits as torch's), scoring.
    "sasrec": ("pipeline/student/sasrec.py", ["tests/test_sasrec.py", "tests/test_perf_distill_ops.py",
                                              "tests/test_train.py", "tests/test_checkpoint.py", "tests/test_mut_sasrec.py"]),
    # The student's training loop: the next-item loss, ranking for validation/test, the two-branch gradients,
    # the epoch loop and early stopping (test_concurrent_distill's installed-command test is marked slow: not run).
    "train": ("pipeline/student/train.py", ["tests/test_train.py", "tests/test_perf_distill_ops.py",
                                            "tests/test_concurrent_distill.py", "tests/test_mut_train.py"]),
    # A store at a URI (s3://, gs://, file://): publishing, resuming and downloading it. test_store_remote runs
    # every command in a subprocess (unseen by mutmut; listed so that the score says so); the in-process tests
    # are test_mut_remote's, on file:// URIs, and the writer's, which open local stores through open_writer.
    "remote": ("pipeline/store/remote.py", ["tests/test_store_remote.py", "tests/test_mut_store_writer.py",
                                            "tests/test_store_corruption.py", "tests/test_mut_remote.py"]),
    # --dtype auto on a CPU: flags first, then a cached matmul probe (issue 10).
    "dtype_choice": ("pipeline/teacher/dtype_choice.py", ["tests/test_dtype_choice.py", "tests/test_mut_dtype_choice.py"]),
    # teacher-tune's samples: user split, training prefixes, forced targets, the shuffle and its chi-square check.
    "tune_data": ("pipeline/teacher/tune_data.py", ["tests/test_teacher_tune.py", "tests/test_leakage.py",
                                                "tests/test_mut_tune_data.py"]),
    # The input adapters: the embedded ML-100K, the user's interaction and item-text files, their errors.
    "sources": ("pipeline/data/sources.py", ["tests/test_prepare.py", "tests/test_mut_sources.py"]),
    # The store's dataset card: what `datasets` reads, what `cache verify` compares, the atomic writer.
    "card": ("pipeline/store/card.py", ["tests/test_dataset_card.py", "tests/test_mut_card.py"]),
    "head": ("pipeline/teacher/head.py", ["tests/test_vllm_head.py", "tests/test_mut_head.py"]),
    "hashcache": ("pipeline/teacher/hashcache.py", ["tests/test_teacher_convert.py", "tests/test_mut_hashcache.py"]),
}

# mutmut's exit codes per mutant (mutmut/stats.py): 1 and 3 killed, 0 survived, 33/5 no tests ran it,
# 24/-24/152/255/36 timeout (counted as detected, as mutmut's own badge does), 34 skipped, 37 type check.
KILLED = {1, 3, 37}
TIMEOUT = {24, -24, 152, 255, 36}
NO_TESTS = {33, 5}


def _populate(dest: Path, source: str) -> str:
    """Copy the project into dest; return the commit (or 'worktree') it came from."""
    parts = ["pipeline", "stages", "tests", "pyproject.toml"]
    if source == "head":
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", "HEAD", *parts], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return commit
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for part in parts:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy2(src, dest / part)
    return "worktree"


def _configure(dest: Path, targets: list[str], tests: list[str]) -> list[str]:
    """Narrow pyproject's [tool.mutmut] to one file and its tests (those that exist in this copy)."""
    present = [t for t in tests if t.startswith("-") or (dest / t.split("::")[0]).exists()]
    text = (dest / "pyproject.toml").read_text()
    text = re.sub(r"^\[tool\.mutmut\].*?(?=^\[|\Z)", "", text, flags=re.S | re.M)
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["pipeline"]\n'
        'also_copy = ["stages"]\n'
        'process_isolation = "forkserver"\n'
        f"only_mutate = {json.dumps(targets)}\n"
        'pytest_add_cli_args = ["-m", "not teacher and not slow and not vllm", "-p", "no:cacheprovider", "--hypothesis-seed=0"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(present)}\n"
    )
    (dest / "pyproject.toml").write_text(text)
    return present


def _blobs(dest: Path, files: list[str]) -> dict[str, str]:
    """git blob id of each file as mutated/tested, to tell later whether a commit still has that code."""
    out = subprocess.run(["git", "hash-object", *files], cwd=dest, check=True, capture_output=True, text=True)
    return dict(zip(files, out.stdout.split()))


def _count(meta: Path) -> dict[str, object]:
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    generated = len(codes)
    codes = {k: c for k, c in codes.items() if c is not None}  # a sampled run leaves the rest unchecked
    killed = sorted(k for k, c in codes.items() if c in KILLED)
    timeout = sorted(k for k, c in codes.items() if c in TIMEOUT)
    survived = sorted(k for k, c in codes.items() if c == 0)
    no_tests = sorted(k for k, c in codes.items() if c in NO_TESTS)
    other = sorted(k for k, c in codes.items() if k not in set(killed + timeout + survived + no_tests))
    total = len(codes)
    detected = len(killed) + len(timeout)
    return {
        "total": total, "generated": generated, "killed": len(killed), "timeout": len(timeout), "survived": survived,
        "no_tests": no_tests, "other": {k: codes[k] for k in other},
        "score": round(100.0 * detected / total, 1) if total else None,
    }


def run_module(name: str, source: str, max_children: int, sample: int | None = None) -> list[dict[str, object]]:
    targets, tests = MODULES[name][0].split(), MODULES[name][1]
    dest = WORK / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    origin = _populate(dest, source)
    present = _configure(dest, targets, tests)
    mutmut = Path(sys.executable).with_name("mutmut")
    env = dict(os.environ, GEDISTILL_NO_PROGRESS="1", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    metas = [dest / "mutants" / (t + ".meta") for t in targets]
    names: list[str] = []
    if sample:
        # Generate the mutants only (mutmut 3's own steps, as `mutmut run` starts), then run a seeded
        # uniform sample of at most `sample` mutants per file: an unbiased estimate of the score.
        gen = ("from mutmut.__main__ import copy_src_dir, copy_also_copy_files, setup_source_paths, "
               "store_lines_covered_by_tests, create_mutants\n"
               "import os; os.makedirs('mutants', exist_ok=True); copy_src_dir(); copy_also_copy_files(); "
               f"setup_source_paths(); store_lines_covered_by_tests(); create_mutants({max_children})")
        subprocess.run([sys.executable, "-c", gen], cwd=dest, env=env, check=True, capture_output=True)
        rng = random.Random(0)
        for meta in metas:
            keys = sorted(json.loads(meta.read_text())["exit_code_by_key"])
            names += sorted(rng.sample(keys, sample)) if len(keys) > sample else keys
    proc = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *names], cwd=dest, env=env,
                          capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    (dest / "mutmut-run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not all(m.exists() for m in metas):
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"mutmut failed on {name} (exit {proc.returncode}); log {dest}/mutmut-run.log\n{tail}")
    results = []
    # The diff of each mutant that no test caught, to read next to docs/MUTATION.md's equivalence notes.
    with open(dest / "survivors.diff", "w") as out:
        for target, meta in zip(targets, metas):
            result = _count(meta)
            for key in result["survived"] + result["no_tests"]:
                shown = subprocess.run([str(mutmut), "show", key], cwd=dest, env=env, capture_output=True, text=True)
                out.write(shown.stdout + "\n")
            label = name if len(targets) == 1 else Path(target).stem
            result.update(module=label, file=target, tests=present, source=origin, seconds=round(elapsed),
                          blobs=_blobs(dest, [target] + [t.split("::")[0] for t in present if not t.startswith("-")]))
            results.append(result)
    (dest / "result.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def _print_table() -> int:
    scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    print("| module | file | mutants | killed | timeout | survived | no tests | score | code |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for label, r in scores.items():
        n = f"{r['total']}" + (f" of {r['generated']} (sample)" if r.get("generated", r["total"]) != r["total"] else "")
        print(f"| {label} | `{r['file']}` | {n} | {r['killed']} | {r['timeout']} | {len(r['survived'])} | "
              f"{len(r['no_tests'])} | {r['score']}% | {r['source']} |")
    return 0


def _report_stale() -> int:
    scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    stale = 0
    for label, r in sorted(scores.items()):
        changed = []
        for path, blob in r.get("blobs", {}).items():
            head = subprocess.run(["git", "rev-parse", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True)
            if head.returncode or head.stdout.strip() != blob:
                changed.append(path)
        if changed or "blobs" not in r:
            stale += 1
        print(f"{label:15s} {'stale: ' + ', '.join(changed) if changed else 'no blobs recorded' if 'blobs' not in r else 'same code as HEAD'}")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help="module names (default: all); see --list")
    ap.add_argument("--source", choices=["head", "worktree"], default="head")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the recorded scores as a Markdown table")
    ap.add_argument("--sample", type=int, metavar="N",
                    help="test a seeded random sample of at most N mutants per file (an estimate, for big modules)")
    ap.add_argument("--stale", action="store_true",
                    help="name the modules whose recorded score was measured on other code than HEAD's")
    args = ap.parse_args(argv)
    if args.stale:
        return _report_stale()
    if args.table:
        return _print_table()
    if args.list:
        for name, (target, tests) in MODULES.items():
            print(f"{name:15s} {target:32s} {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {sorted(MODULES)}")
    WORK.mkdir(parents=True, exist_ok=True)
    scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    for name in args.modules or list(MODULES):
        for r in run_module(name, args.source, args.max_children, args.sample):
            # re-read: another run (another module) may have written in the meantime
            scores = json.loads(SCORES.read_text()) if SCORES.exists() else {}
            scores[r["module"]] = r
            SCORES.write_text(json.dumps(scores, indent=1, sort_keys=True))
            of = f"{r['total']}" + (f" sampled of {r['generated']}" if r["generated"] != r["total"] else "")
            print(f"{r['module']:15s} {r['score']}%  killed {r['killed']} + timeout {r['timeout']} of {of}; "
                  f"survived {len(r['survived'])}, no tests {len(r['no_tests'])}  [{r['source']}, {r['seconds']} s]",
                  flush=True)
            for k in r["survived"] + r["no_tests"]:
                print(f"    {'survived' if k in r['survived'] else 'no tests'}: {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
