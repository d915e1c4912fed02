"""Loading the CLI does not load matplotlib: the GPU machine (benchmarks/gpu_tune.py) and any stage-one-only
environment run teacher-tune / teacher-dump without it. Fails if a module the CLI imports at load time
imports pipeline.evaluation.plots (or matplotlib) at its top again, as stages/evaluate.py did."""

from __future__ import annotations

import subprocess
import sys


def test_cli_loads_without_matplotlib():
    code = "import sys, stages.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"matplotlib modules loaded with the CLI: {out[:200]}"
