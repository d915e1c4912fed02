"""Bad-input campaign (issue 9): user mistakes given to every command, through the installed `gedistill`.

Each case must exit 2 (a user mistake; never a traceback), print a message that says what to do, and
leave nothing complete-looking behind (no summary.json, checkpoint config, candidates file, store
manifest or metrics file where the command failed). `benchmarks/campaign_bad_inputs.py` runs the same
cases and writes the table in docs/RELIABILITY.md.

A read-only folder and a full disk are real: tiny tmpfs mounts when running as root (a read-only
mount stops root too; chmod does not); without root the read-only folder is chmod 555 and the
full-disk cases are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_entrypoint import run_gedistill

pytestmark = pytest.mark.slow  # about 40 subprocesses of the installed command


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # "{w}" stands for the world folder
    message: str  # must appear in stderr (whitespace collapsed): says what is wrong or what to do
    leaves: tuple[str, ...] = ()  # paths under the world that must not exist afterwards
    needs: str = ""  # "full": needs the full-disk mount


TINY = ("--hidden", "16", "--max-len", "8", "--epochs", "1", "--threads", "1")
PREP = ("--prepared", "{w}/prepared")

CASES: list[Case] = [
    # prepare
    Case("prepare: interactions file missing", ("prepare", "--out", "{w}/o/p1", "--interactions", "{w}/nope.csv"),
         "nope.csv: no such file", ("o/p1/summary.json",)),
    Case("prepare: a directory given as the interactions file",
         ("prepare", "--out", "{w}/o/p2", "--interactions", "{w}/adir"), "is a directory; pass the interactions file",
         ("o/p2",)),
    Case("prepare: malformed CSV", ("prepare", "--out", "{w}/o/p3", "--interactions", "{w}/bad.csv"),
         "cannot be read as csv", ("o/p3/summary.json",)),
    Case("prepare: malformed Parquet", ("prepare", "--out", "{w}/o/p4", "--interactions", "{w}/bad.parquet"),
         "cannot be read as parquet", ("o/p4/summary.json",)),
    Case("prepare: unknown user column", ("prepare", "--out", "{w}/o/p5", "--interactions", "{w}/inter.csv",
                                          "--user-col", "uid"), "missing user column 'uid'", ("o/p5/summary.json",)),
    Case("prepare: non-numeric timestamps", ("prepare", "--out", "{w}/o/p6", "--interactions", "{w}/badts.csv"),
         "non-numeric or non-finite timestamps", ("o/p6/summary.json",)),
    Case("prepare: wrong type (--kcore abc)", ("prepare", "--kcore", "abc"), "Invalid value for '--kcore'"),
    Case("prepare: --items without --interactions (exclusive)", ("prepare", "--out", "{w}/o/p7", "--items",
                                                                 "{w}/items.csv"), "--items needs --interactions",
         ("o/p7",)),
    Case("prepare: --out is an existing file", ("prepare", "--out", "{w}/afile", "--interactions", "{w}/inter.csv"),
         "is a file"),
    Case("prepare: read-only --out", ("prepare", "--out", "{w}/ro/p", "--interactions", "{w}/inter.csv"),
         "cannot write to", ("ro/p",)),
    Case("prepare: disk full", ("prepare", "--out", "{w}/full/p", "--interactions", "{w}/inter.csv"),
         "No space left on device", ("full/p/summary.json",), "full"),
    # student-train
    Case("student-train: prepared folder missing", ("student-train", "--prepared", "{w}/nope", "--out", "{w}/o/s1"),
         "run `gedistill prepare", ("o/s1",)),
    Case("student-train: distillation option without --teacher-cache",
         ("student-train", *PREP, "--emb-loss", "mse", "--out", "{w}/o/s2"), "add --teacher-cache", ("o/s2",)),
    Case("student-train: a file given as the teacher store",
         ("student-train", *PREP, "--teacher-cache", "{w}/afile", "--out", "{w}/o/s3"), "not a teacher store",
         ("o/s3/config.json",)),
    Case("student-train: store of another prepared dataset",
         ("student-train", *PREP, "--teacher-cache", "{w}/other/store", "--out", "{w}/o/s4", *TINY),
         "made from other data", ("o/s4/config.json",)),
    Case("student-train: store checked against other candidates",
         ("student-train", *PREP, "--teacher-cache", "{w}/store", "--candidates", "{w}/cands2.parquet",
          "--out", "{w}/o/s5", *TINY), "candidates fingerprint", ("o/s5/config.json",)),
    Case("student-train: --hidden not divisible by --heads", ("student-train", *PREP, "--hidden", "30", "--heads", "4"),
         "must be divisible by --heads"),
    Case("student-train: wrong type (--epochs abc)", ("student-train", "--epochs", "abc"),
         "Invalid value for '--epochs'"),
    Case("student-train: --calibrate on a generated ranking",
         ("student-train", *PREP, "--teacher-cache", "{w}/store-gen", "--calibrate", "--out", "{w}/o/s6", *TINY),
         "drop --calibrate", ("o/s6/config.json",)),
    Case("student-train: --init baseline from a missing checkpoint",
         ("student-train", *PREP, "--teacher-cache", "{w}/store", "--init", "baseline", "--baseline", "{w}/nope",
          "--out", "{w}/o/s7", *TINY), "no student checkpoint", ("o/s7/config.json",)),
    Case("student-train: read-only --out", ("student-train", *PREP, "--out", "{w}/ro/s", *TINY), "cannot write to",
         ("ro/s",)),
    Case("student-train: disk full", ("student-train", *PREP, "--out", "{w}/full/s", "--metrics", "{w}/full/m.json",
                                      *TINY), "No space left on device", ("full/s/config.json", "full/m.json"), "full"),
    # retrieve
    Case("retrieve: student checkpoint missing", ("retrieve", *PREP, "--student", "{w}/nope", "--out", "{w}/o/c1.parquet"),
         "run `gedistill student-train` first", ("o/c1.parquet",)),
    Case("retrieve: student trained on other data",
         ("retrieve", *PREP, "--student", "{w}/other/baseline", "--out", "{w}/o/c2.parquet"),
         "trained on other prepared data", ("o/c2.parquet",)),
    Case("retrieve: --k above the 26 identifiers", ("retrieve", "--k", "27"), "Invalid value for '--k'"),
    Case("retrieve: --out is a directory", ("retrieve", *PREP, "--student", "{w}/baseline", "--out", "{w}/adir"),
         "is a directory; give the candidates file's path"),
    Case("retrieve: read-only --out", ("retrieve", *PREP, "--student", "{w}/baseline", "--out", "{w}/ro/c.parquet"),
         "cannot write to", ("ro/c.parquet",)),
    Case("retrieve: disk full", ("retrieve", *PREP, "--student", "{w}/baseline", "--out", "{w}/full/c.parquet"),
         "No space left on device", ("full/c.parquet",), "full"),
    # teacher-dump (all refused before the model loads)
    Case("teacher-dump: candidates file missing", ("teacher-dump", *PREP, "--candidates", "{w}/nope.parquet",
                                                   "--out", "{w}/o/t1"), "run `gedistill retrieve` first", ("o/t1",)),
    Case("teacher-dump: malformed candidates Parquet",
         ("teacher-dump", *PREP, "--candidates", "{w}/bad.parquet", "--out", "{w}/o/t2"),
         "not a gedistill candidates file", ("o/t2",)),
    Case("teacher-dump: candidates of another prepared dataset",
         ("teacher-dump", *PREP, "--candidates", "{w}/other/cands.parquet", "--out", "{w}/o/t3"),
         "other prepared data", ("o/t3",)),
    Case("teacher-dump: --worker-index out of range", ("teacher-dump", "--num-workers", "2", "--worker-index", "2"),
         "--worker-index must be below --num-workers"),
    Case("teacher-dump: --tensor-parallel-size with --backend hf (ignored there)",
         ("teacher-dump", "--backend", "hf", "--tensor-parallel-size", "2"), "apply to --backend vllm only"),
    Case("teacher-dump: --gpu-memory-utilization with --backend hf (ignored there)",
         ("teacher-dump", "--backend", "hf", "--gpu-memory-utilization", "0.5"), "apply to --backend vllm only"),
    Case("teacher-dump: wrong choice (--mode sideways)", ("teacher-dump", "--mode", "sideways"),
         "Invalid value for '--mode'"),
    Case("teacher-dump: --out is an existing file",
         ("teacher-dump", *PREP, "--candidates", "{w}/cands.parquet", "--out", "{w}/afile"), "is a file"),
    Case("teacher-dump: read-only --out", ("teacher-dump", *PREP, "--candidates", "{w}/cands.parquet",
                                           "--out", "{w}/ro/t"), "cannot write to", ("ro/t",)),
    # evaluate
    Case("evaluate: distilled checkpoint missing", ("evaluate", *PREP, "--baseline", "{w}/baseline", "--distilled",
                                                    "{w}/nope", "--metrics", "{w}/o/e1.json", "--plots", "{w}/o/pl1"),
         "run `gedistill student-train` first", ("o/e1.json",)),
    Case("evaluate: checkpoint of other data", ("evaluate", *PREP, "--baseline", "{w}/baseline", "--distilled",
                                                "{w}/other/baseline", "--metrics", "{w}/o/e2.json", "--plots",
                                                "{w}/o/pl2"), "trained on other prepared data", ("o/e2.json",)),
    Case("evaluate: --n-boot below its minimum", ("evaluate", "--n-boot", "10"), "Invalid value for '--n-boot'"),
    Case("evaluate: not a store as --teacher-cache",
         ("evaluate", *PREP, "--baseline", "{w}/baseline", "--distilled", "{w}/baseline", "--teacher-cache",
          "{w}/adir", "--metrics", "{w}/o/e3.json", "--plots", "{w}/o/pl3"), "not a teacher store", ("o/e3.json",)),
    Case("evaluate: read-only --plots", ("evaluate", *PREP, "--baseline", "{w}/baseline", "--distilled",
                                         "{w}/baseline", "--metrics", "{w}/o/e4.json", "--plots", "{w}/ro/pl"),
         "cannot write to", ("o/e4.json",)),
    Case("evaluate: disk full", ("evaluate", *PREP, "--baseline", "{w}/baseline", "--distilled", "{w}/baseline",
                                 "--metrics", "{w}/full/e.json", "--plots", "{w}/o/pl5", "--n-boot", "100"),
         "No space left on device", ("full/e.json",), "full"),
    # cache
    Case("cache info: store folder missing", ("cache", "info", "{w}/nope"), "does not exist"),
    Case("cache info: a file where the store folder goes", ("cache", "info", "{w}/afile"), "is a file"),
    Case("cache verify: a folder that is not a store", ("cache", "verify", "{w}/adir"), "manifest.json"),
    Case("cache verify: a shard with a flipped byte", ("cache", "verify", "{w}/store-bad"), "part-00000"),
    Case("cache merge: a source that is not a store", ("cache", "merge", "{w}/o/m1", "{w}/adir"), "manifest.json",
         ("o/m1/manifest.json",)),
    Case("cache merge: no sources (missing argument)", ("cache", "merge", "{w}/o/m2"), "Missing argument",
         ("o/m2/manifest.json",)),
]


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _fill(folder: Path) -> None:
    """Write until the file system is full: later writes fail with ENOSPC, creating empty files still works."""
    try:
        with open(folder / ".filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


def build_world(root: Path) -> dict[str, bool]:
    """The inputs the cases refer to, built in-process (fast): prepared data, a baseline, candidates,
    teacher stores of the fake teacher (first-token, generate, one corrupted), a second dataset, bad
    files, a read-only folder and a full disk. Returns which special mounts are real."""
    import polars as pl

    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from stages.cli import main
    from tests.conftest import synthetic_interactions
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend

    def cli(*argv: str) -> None:
        try:
            main(list(argv))
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"building the world: {argv} exited {e.code}") from None

    def world(w: Path, seed: int) -> None:
        synthetic_interactions(seed=seed).write_csv(w / "inter.csv")
        cli("prepare", "--out", str(w / "prepared"), "--interactions", str(w / "inter.csv"))
        cli("student-train", "--prepared", str(w / "prepared"), "--out", str(w / "baseline"),
            "--metrics", str(w / "metrics/baseline.json"), *TINY)
        cli("retrieve", "--prepared", str(w / "prepared"), "--student", str(w / "baseline"),
            "--out", str(w / "cands.parquet"), "--k", "5")
        inputs = load_inputs(w / "prepared", w / "cands.parquet")
        run_dump(DumpConfig(shard_rows=32), inputs, FakeBackend(), FAKE_TEACHER, w / "store")

    root.mkdir(parents=True, exist_ok=True)
    (root / "other").mkdir(exist_ok=True)
    world(root, seed=0)
    world(root / "other", seed=1)
    cli("retrieve", "--prepared", str(root / "prepared"), "--student", str(root / "baseline"),
        "--out", str(root / "cands2.parquet"), "--k", "5", "--samples-per-user", "2")
    inputs = load_inputs(root / "prepared", root / "cands.parquet")
    run_dump(DumpConfig(shard_rows=32, mode="generate"), inputs, FakeBackend(), FAKE_TEACHER, root / "store-gen")
    shutil.copytree(root / "store", root / "store-bad")
    shard = sorted((root / "store-bad").glob("part-00000-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    pl.DataFrame({"item_id": [f"i{i}" for i in range(40)], "title": [f"Movie {i}" for i in range(40)]}).write_csv(
        root / "items.csv")
    (root / "adir").mkdir(exist_ok=True)
    (root / "afile").write_text("not a folder\n")
    (root / "bad.csv").write_bytes(b'user_id,item_id,timestamp\n"u1,i1,1\n\x00\x01\x02')
    (root / "bad.parquet").write_text("not parquet\n")
    (root / "badts.csv").write_text("user_id,item_id,timestamp\nu1,i1,abc\nu1,i2,def\nu1,i3,ghi\n")
    ro = _mount_tmpfs(root / "ro", "ro,size=64k")
    if not ro:
        os.chmod(root / "ro", 0o555)
    full = _mount_tmpfs(root / "full", "size=64k")
    if full:
        _fill(root / "full")
    return {"readonly_mount": ro, "full": full}


def unmount(root: Path) -> None:
    for name in ("ro", "full"):
        if os.path.ismount(root / name):
            subprocess.run(["umount", str(root / name)], capture_output=True)
    if (root / "ro").exists():
        os.chmod(root / "ro", 0o755)


def run_case(case: Case, root: Path, timeout: float = 300) -> dict:
    args = [a.replace("{w}", str(root)) for a in case.args]
    command = "gedistill " + " ".join(a.replace(str(root), "W") for a in args)
    try:
        r = run_gedistill(*args, cwd=root, timeout=timeout)
    except subprocess.TimeoutExpired:  # e.g. an option accepted and ignored: the command just ran
        return {"case": case.name, "command": command, "exit": None, "message": f"still running after {timeout:.0f} s",
                "traceback": False, "says": False, "left_behind": [p for p in case.leaves if (root / p).exists()]}
    err = " ".join(r.stderr.split())
    lines = [ln.strip(" │╭╰─") for ln in r.stderr.splitlines()]
    # the message: our `error: ...` or click's `Error: ...` line (log lines may come first)
    first = next((ln for ln in lines if ln.lower().startswith("error")), next((ln for ln in lines if ln), ""))
    first = first.replace(str(root), "W")
    left = [p for p in case.leaves if (root / p).exists()]
    return {"case": case.name, "command": command, "exit": r.returncode, "message": first, "traceback": "Traceback" in r.stderr,
            "says": case.message in err, "left_behind": left}


def run_all(root: Path, cases: list[Case], mounts: dict[str, bool], workers: int = 3,
            timeout: float = 300) -> list[dict]:
    """Every case, `workers` at a time (each is a fresh process: most of its time is importing torch)."""
    todo = [c for c in cases if not c.needs or mounts.get(c.needs)]
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip((c.name for c in todo), pool.map(lambda c: run_case(c, root, timeout), todo)))
    return [done.get(c.name) or {"case": c.name, "skipped": f"needs a {c.needs} mount (root)"} for c in cases]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    mounts = build_world(root)
    try:
        yield {r["case"]: r for r in run_all(root, CASES, mounts)}
    finally:
        unmount(root)


def test_at_least_25_distinct_cases_over_every_command():
    assert len({c.name for c in CASES}) == len(CASES) >= 25
    commands = {c.args[0] for c in CASES}
    assert commands == {"prepare", "student-train", "retrieve", "teacher-dump", "evaluate", "cache"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, campaign):
    """Fails if the command accepts the mistake, crashes with a traceback, exits other than 2, says
    nothing useful, or leaves a complete-looking output behind."""
    r = campaign[case.name]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert not r["traceback"], r
    assert r["exit"] == 2, r
    assert r["says"], f"stderr lacks {case.message!r}: {r}"
    assert not r["left_behind"], r
