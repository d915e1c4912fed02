"""Student checkpoints: a save interrupted at any step is never loadable as complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pipeline.student.checkpoint as ckpt
from pipeline.student.checkpoint import COMPLETE, CONFIG, WEIGHTS, load_student, save_student
from pipeline.errors import UsageError
from pipeline.student.sasrec import SASRec, SasrecConfig


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler catches it)."""


def _model(seed: int) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SasrecConfig(n_items=20, hidden=8, n_blocks=1, n_heads=1, inner=16, max_len=5))


def _save(folder: Path, seed: int) -> SASRec:
    m = _model(seed)
    save_student(folder, m, {"run": f"seed{seed}"}, extra_tensors={"projector.weight": torch.full((8, 3), float(seed))})
    return m


def test_round_trip_and_marker(tmp_path):
    m = _save(tmp_path, 1)
    loaded, meta = load_student(tmp_path)
    assert meta["run"] == "seed1" and (tmp_path / COMPLETE).is_file()
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("kill_at", range(3))
def test_a_save_killed_at_any_rename_is_never_loaded(tmp_path, monkeypatch, kill_at):
    """A complete checkpoint of run 1 is overwritten by run 2, killed before the (kill_at+1)-th rename
    (weights, config, marker). Fails if the folder then loads: the old code loaded run 2's weights
    with run 1's config (kill after the weights' rename), a pair no run ever wrote."""
    _save(tmp_path, 1)
    real, calls = ckpt.os.replace, []

    def replace(a, b):
        if len(calls) == kill_at:
            raise Killed
        calls.append(b)
        real(a, b)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(Killed):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt.os, "replace", real)
    with pytest.raises(UsageError, match="incomplete student checkpoint.*rerun `gedistill student-train`"):
        load_student(tmp_path)
    _save(tmp_path, 2)  # the rerun starts over cleanly over the leftovers
    assert load_student(tmp_path)[1]["run"] == "seed2"


def test_a_save_killed_while_writing_the_weights_is_never_loaded(tmp_path, monkeypatch):
    """Half a weights file (the kill lands inside safetensors' write). Fails if the old complete
    checkpoint stays loadable while its files are being replaced."""
    _save(tmp_path, 1)

    def half_write(tensors, path):
        Path(path).write_bytes(b"\x00" * 10)
        raise Killed

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(Killed):
        _save(tmp_path, 2)
    with pytest.raises(UsageError, match="incomplete"):
        load_student(tmp_path)


def test_changed_files_and_legacy_folders_are_refused(tmp_path):
    """Fails if weights changed after the save, or a folder without a completion marker, load as complete."""
    _save(tmp_path / "a", 1)
    w = tmp_path / "a" / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=f"{WEIGHTS}: sha256 differs from the completion marker"):
        load_student(tmp_path / "a")
    _save(tmp_path / "b", 1)
    cfg = json.loads((tmp_path / "b" / CONFIG).read_text())
    (tmp_path / "b" / CONFIG).write_text(json.dumps({**cfg, "run": "edited"}))
    with pytest.raises(UsageError, match=f"{CONFIG}: sha256 differs"):
        load_student(tmp_path / "b")
    _save(tmp_path / "c", 1)
    (tmp_path / "c" / COMPLETE).unlink()
    with pytest.raises(UsageError, match="no COMPLETE marker"):
        load_student(tmp_path / "c")
    with pytest.raises(UsageError, match="no student checkpoint.*run `gedistill student-train` first"):
        load_student(tmp_path / "empty")
