"""How long an idle OpenMP worker spins before it sleeps, for gedistill's own processes (issue 10).

torch's CPU builds run their intra-op threads on libgomp. Between two parallel regions a worker spins
GOMP_SPINCOUNT turns (300,000 by default) before it sleeps. On an idle machine that spin is free. When another
job holds a core, the spinning worker takes time that the job, or the other worker it waits for, needs.
Measured side by side on Zen 4, 2 cores, with `benchmarks/ab_wait_policy.py` (BENCHMARKS.md, "OpenMP workers
spin less"), teacher-dump at 2 threads:
- beside one busy process: 30,000 turns 0.90x the dump time of the default (3 of 3 rounds), 10,000 turns
  0.80x (11 of 11), OMP_WAIT_POLICY=PASSIVE (no spin) 0.73-0.78x, --threads 1 0.72-0.78x;
- on the idle machine: 30,000 turns 0.993x (3 of 6 rounds faster); 10,000 turns 1.004x, 1.022x and 1.054x in
  three runs (3 of 6, 1 of 6, 0 of 4); PASSIVE 1.045-1.055x.
30,000 is the shortest spin that showed no cost on the idle machine, which the issue's goals are measured on.
The arithmetic is the same: the stores were byte-identical on every side.

libgomp reads its environment once, when torch loads it, so this must run before the first `import torch`.
A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SPIN_COUNT = 30_000
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def shorten_spin(environ: MutableMapping[str, str] = os.environ) -> tuple[bool, str]:
    """Set GOMP_SPINCOUNT for libgomp, unless the user chose a wait policy or spin count, or torch (and so
    libgomp) is loaded already. Returns whether it was set here, and what was decided (for a log line)."""
    if user := [k for k in USER_SETTINGS if k in environ]:
        return False, f"OpenMP wait settings from the environment ({', '.join(f'{k}={environ[k]}' for k in user)})"
    if "torch" in sys.modules:
        return False, "OpenMP wait settings left as they are (torch was loaded before gedistill's command line)"
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True, f"idle OpenMP workers spin {SPIN_COUNT} turns before they sleep (GOMP_SPINCOUNT)"
