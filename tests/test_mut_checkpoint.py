"""Student checkpoints, the refusals and files test_checkpoint.py left unchecked (docs/MUTATION.md): each message
word for word, a folder holding only some of the files, an unreadable marker, the extra tensors saved with the
weights, a folder made with its parents, and the JSON files' bytes (checkpoints are DVC outputs)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import UsageError
from pipeline.student.checkpoint import COMPLETE, CONFIG, WEIGHTS, check_complete, load_student, save_student
from pipeline.store import sha256_file
from tests.test_checkpoint import _model

RERUN = "rerun `gedistill student-train` to write it again"


def test_extra_tensors_are_saved_beside_the_weights_and_the_json_files_bytes(tmp_path):
    folder = tmp_path / "runs" / "distilled"  # made, parents and all
    m = _model(0)
    save_student(folder, m, {"run": "x"}, extra_tensors={"projector.weight": torch.full((8, 3), 2.0)})
    stored = load_file(str(folder / WEIGHTS))
    assert torch.equal(stored["projector.weight"], torch.full((8, 3), 2.0))
    assert set(stored) == set(m.state_dict()) | {"projector.weight"}
    cfg = json.loads((folder / CONFIG).read_text())
    assert (folder / CONFIG).read_text() == json.dumps(cfg, indent=2) + "\n"
    assert cfg["run"] == "x" and cfg["weights_sha256"] == sha256_file(folder / WEIGHTS)
    marker = {"weights_sha256": sha256_file(folder / WEIGHTS), "config_sha256": sha256_file(folder / CONFIG)}
    assert (folder / COMPLETE).read_text() == json.dumps(marker, indent=2) + "\n"
    model, meta = load_student(folder)  # the extra tensor is not the model's: left out on load
    assert meta == cfg and not model.training


@pytest.mark.parametrize("present", [[WEIGHTS], [CONFIG]])
def test_a_folder_with_some_files_and_no_marker_is_incomplete_not_absent(tmp_path, present):
    save_student(tmp_path, _model(0), {})
    (tmp_path / COMPLETE).unlink()
    for name in {WEIGHTS, CONFIG} - set(present):
        (tmp_path / name).unlink()
    with pytest.raises(UsageError) as e:
        check_complete(tmp_path)
    assert str(e.value) == (f"{tmp_path}: incomplete student checkpoint (no {COMPLETE} marker: a run was interrupted "
                            f"while writing it, or an older gedistill wrote it); {RERUN}")


def test_no_checkpoint_at_all(tmp_path):
    with pytest.raises(UsageError) as e:
        check_complete(tmp_path)
    assert str(e.value) == (f"{tmp_path}: no student checkpoint ({WEIGHTS} + {CONFIG}); run `gedistill "
                            "student-train` first")


@pytest.mark.parametrize("marker", ["{not json", "[1, 2]", '{"weights_sha256": "x"}'])
def test_an_unreadable_marker_is_refused(tmp_path, marker):
    save_student(tmp_path, _model(0), {})
    (tmp_path / COMPLETE).write_text(marker)
    with pytest.raises(UsageError) as e:
        check_complete(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / COMPLETE}: unreadable completion marker (")
    assert str(e.value).endswith(f"); {RERUN}")


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
def test_a_file_missing_beside_its_marker_is_named(tmp_path, name):
    save_student(tmp_path, _model(0), {})
    (tmp_path / name).unlink()
    with pytest.raises(UsageError) as e:
        check_complete(tmp_path)
    assert str(e.value) == (f"{tmp_path}: incomplete student checkpoint ({name} is missing: a run was interrupted "
                            f"while replacing it); {RERUN}")


def test_a_changed_file_is_named_with_what_to_do(tmp_path):
    save_student(tmp_path, _model(0), {})
    (tmp_path / CONFIG).write_text((tmp_path / CONFIG).read_text() + " ")
    with pytest.raises(UsageError) as e:
        check_complete(tmp_path)
    assert str(e.value) == (f"{tmp_path / CONFIG}: sha256 differs from the completion marker (changed or half-written "
                            f"after the checkpoint was saved); {RERUN}")
