"""Student checkpoints: safetensors weights + a JSON config. Never a pickle."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.errors import UsageError
from pipeline.sasrec import SASRec, SasrecConfig
from pipeline.store import sha256_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_student(folder: Path, model: SASRec, meta: dict, extra_tensors: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().contiguous()
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / WEIGHTS)
    cfg = {"sasrec": asdict(model.config), **meta, "weights_sha256": sha256_file(folder / WEIGHTS)}
    tmp = folder / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG)


def load_student(folder: Path) -> tuple[SASRec, dict]:
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise UsageError(f"{folder}: no student checkpoint ({WEIGHTS} + {CONFIG}); run `gedistill student-train` first")
    meta = json.loads((folder / CONFIG).read_text())
    model = SASRec(SasrecConfig(**meta["sasrec"]))
    state = load_file(str(folder / WEIGHTS))
    own = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(own)
    model.eval()
    return model, meta
