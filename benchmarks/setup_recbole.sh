#!/usr/bin/env bash
# Creates a separate virtual environment with RecBole 1.2.1 for side-by-side comparisons
# (benchmarks/recbole_reference.py, benchmarks/bench_student.py). See DESIGN.md point 12.
#
# Usage: bash benchmarks/setup_recbole.sh [VENV_DIR]   (default: <repo>/.venv-recbole)
# Re-runnable: an existing venv is reused, pip skips what is installed, the patch is idempotent.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-recbole}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip: quiet, without the local-index "is ignored" notices. After the --no-deps install of
# recbole, pip lists ray/plotly/thop/tabulate as missing: expected, nothing here imports them.
pipi() {
    "$VPY" -m pip install -q "$@" 2> >(grep -v -E "is ignored: it is neither a file nor a directory|dependency resolver does not currently take|^recbole 1\.2\.1 requires (plotly|ray|tabulate|thop)" >&2)
}

# torch is pinned exactly: the CPU wheel lies on local disk; any other version would pull CUDA.
pipi "setuptools<81" wheel
pipi "torch==2.13.0"
# RecBole itself without its dependency list (it asks for ray<=2.6.3, plotly, thop, ... that
# only quick_start / hyper-tuning use), then exactly what its data, model, trainer and
# evaluator modules import. numpy/pandas pins: RecBole 1.2.1 breaks on numpy 2 / pandas >= 2.2.
pipi --no-deps "recbole==1.2.1"
pipi \
    "torch==2.13.0" \
    "numpy==1.26.4" \
    "pandas==2.1.4" \
    "scipy>=1.6,<1.14" \
    "scikit-learn>=1.3,<1.6" \
    "tqdm>=4.48.2" \
    "colorlog==4.7.2" \
    "colorama==0.4.4" \
    "pyyaml>=5.1" \
    "texttable>=0.9.0" \
    "tensorboard>=2.5" \
    "psutil>=5.9"

# torch >= 2.6 defaults torch.load to weights_only=True; RecBole's checkpoints hold a config
# object. Patch its two calls (idempotent: only calls without weights_only are touched).
TRAINER="$("$VPY" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("recbole")
print(os.path.join(spec.submodule_search_locations[0], "trainer", "trainer.py"))
EOF
)"
sed -i -E '/weights_only/! s/torch\.load\(([^)]*)map_location=self\.device\)/torch.load(\1map_location=self.device, weights_only=False)/' "$TRAINER"
n="$(grep -c 'torch.load(.*weights_only=False)' "$TRAINER" || true)"
if [ "$n" != "2" ]; then
    echo "setup_recbole: expected 2 patched torch.load calls in $TRAINER, found $n" >&2
    exit 1
fi

"$VPY" - <<'EOF'
import torch, numpy, pandas, recbole
from recbole.config import Config  # noqa: F401
from recbole.data import create_dataset, data_preparation  # noqa: F401
from recbole.model.sequential_recommender import SASRec  # noqa: F401
from recbole.trainer import Trainer  # noqa: F401
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, pandas {pandas.__version__}")
EOF
echo "RecBole venv ready: $VENV"
