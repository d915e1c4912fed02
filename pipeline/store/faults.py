"""Test-only fault injection for the store writer: die with SIGKILL at a chosen point.

`GEDISTILL_FAULT=before-rename:2` kills the process the 2nd time it reaches `before-rename`.
Kills at random times rarely land inside a rename or a manifest write; these points make the
crash campaign (benchmarks/campaign_store.py, tests/test_store_faults.py) hit them every time.
Points whose name starts with `mid-` or `torn-` first cut the file just written to half its size:
`mid-` a temporary file (a write cut short), `torn-` the final file (a rename that reached the disk
before the data did, as after a power loss). Unset in normal use: the check is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from pathlib import Path

ENV = "GEDISTILL_FAULT"
POINTS = ("before-shard-write", "mid-shard-write", "before-rename", "after-rename", "torn-shard",
          "mid-manifest-write", "before-manifest-rename", "torn-manifest", "after-manifest")
# A store at a URI (store.remote): its uploads, after the local points of the staging copy. Kept apart from
# POINTS, which the local crash campaign iterates over (a local dump never reaches these).
REMOTE_POINTS = ("before-shard-upload", "mid-shard-upload", "after-shard-upload", "before-manifest-upload",
                 "after-manifest-upload")

log = logging.getLogger(__name__)
_reached: Counter[str] = Counter()


def fault_point(name: str, path: Path | None = None) -> None:
    """SIGKILL this process if GEDISTILL_FAULT names this point and this is the asked occurrence."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in POINTS + REMOTE_POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point; one of {', '.join(POINTS + REMOTE_POINTS)}")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    if path is not None and name.startswith(("mid-", "torn-")):
        os.truncate(path, path.stat().st_size // 2)
    log.warning("%s=%s: killing this process (test-only fault injection)", ENV, spec)
    os.kill(os.getpid(), signal.SIGKILL)
