"""sha256 of a teacher's files, computed once per file version and cached, so a 16 GB model is not rehashed per run.

The cache (`file-sha256.json` in the gedistill cache directory) maps a file's resolved path to its
sha256 and the stat fields that change whenever its bytes can have changed: size, mtime_ns, and
also ctime_ns and inode, which no tool can set back (a copy that keeps mtime still gets a new ctime).
A file modified within the last few seconds is hashed but not cached: on filesystems with coarse
timestamps a second write in the same tick would keep the same stamp (git's "racy" rule).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pipeline.store import sha256_file

log = logging.getLogger(__name__)

CACHE_FILE = "file-sha256.json"
RACY_NS = 3_000_000_000


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cached_sha256(file: Path, cache_dir: Path) -> str:
    """sha256 of `file`, from the cache when its stamp is unchanged, else computed (and cached)."""
    file = Path(file).resolve()
    st = file.stat()
    cache = cache_dir / CACHE_FILE
    known = _load(cache)
    hit = known.get(str(file))
    if isinstance(hit, dict) and hit.get("stamp") == _stamp(st) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    if st.st_size > 1 << 30:
        log.info("hashing %s (%.1f GB) once; later runs reuse the result", file, st.st_size / 1e9)
    digest = sha256_file(file)
    after = file.stat()
    if _stamp(after) != _stamp(st) or time.time_ns() - after.st_mtime_ns < RACY_NS:
        return digest  # changing while read, or too fresh to trust its stamp: do not cache
    known = _load(cache)  # reread: another process may have added entries meanwhile
    known[str(file)] = {"stamp": _stamp(st), "sha256": digest}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as e:  # a read-only cache costs a rehash next time, nothing else
        log.warning("could not cache the sha256 of %s in %s: %s", file.name, cache, e)
    return digest
