"""Student checkpoints: safetensors weights + a JSON config + a completion marker. Never a pickle.

A checkpoint is complete only when its marker exists: `save_student` removes the old marker first,
writes each file under a temporary name and renames it into place, and writes the marker (the
sha256 of both files) last. A kill -9 at any moment therefore leaves either the old complete
checkpoint untouched or a folder that `load_student` refuses; never a mix it would load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.errors import UsageError
from pipeline.student.sasrec import SASRec, SasrecConfig
from pipeline.store import sha256_file

WEIGHTS, CONFIG, COMPLETE = "model.safetensors", "config.json", "COMPLETE"


def _replace(tmp: Path, final: Path) -> None:
    """fsync then rename: the final name only ever points at a whole file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def invalidate(folder: Path) -> None:
    """Make the checkpoint in `folder` (if any) unloadable, before any of its files is replaced."""
    (Path(folder) / COMPLETE).unlink(missing_ok=True)


def save_student(folder: Path, model: SASRec, meta: dict, extra_tensors: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    invalidate(folder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().contiguous()
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    _replace(tmp, folder / WEIGHTS)
    cfg = {"sasrec": asdict(model.config), **meta, "weights_sha256": sha256_file(folder / WEIGHTS)}
    tmp = folder / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    _replace(tmp, folder / CONFIG)
    marker = {"weights_sha256": cfg["weights_sha256"], "config_sha256": sha256_file(folder / CONFIG)}
    tmp = folder / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    _replace(tmp, folder / COMPLETE)


def check_complete(folder: Path) -> None:
    """Refuse a folder without a whole checkpoint, with a message that says what to do."""
    folder = Path(folder)
    rerun = "rerun `gedistill student-train` to write it again"
    if not (folder / COMPLETE).is_file():
        if not (folder / WEIGHTS).exists() and not (folder / CONFIG).exists():
            raise UsageError(f"{folder}: no student checkpoint ({WEIGHTS} + {CONFIG}); run `gedistill student-train` first")
        raise UsageError(f"{folder}: incomplete student checkpoint (no {COMPLETE} marker: a run was interrupted while "
                         f"writing it, or an older gedistill wrote it); {rerun}")
    try:
        marker = json.loads((folder / COMPLETE).read_text())
        want = {WEIGHTS: marker["weights_sha256"], CONFIG: marker["config_sha256"]}
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{folder / COMPLETE}: unreadable completion marker ({e}); {rerun}") from e
    for name, sha in want.items():
        if not (folder / name).is_file():
            raise UsageError(f"{folder}: incomplete student checkpoint ({name} is missing: a run was interrupted "
                             f"while replacing it); {rerun}")
        if sha256_file(folder / name) != sha:
            raise UsageError(f"{folder / name}: sha256 differs from the completion marker (changed or half-written "
                             f"after the checkpoint was saved); {rerun}")


def load_student(folder: Path) -> tuple[SASRec, dict]:
    folder = Path(folder)
    check_complete(folder)
    meta = json.loads((folder / CONFIG).read_text())
    model = SASRec(SasrecConfig(**meta["sasrec"]))
    state = load_file(str(folder / WEIGHTS))
    own = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(own)
    model.eval()
    return model, meta
