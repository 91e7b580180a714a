"""Checkpoints: round trip, sha256 seal over every byte, weights-only loading, meta checks."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from model.serving.checkpoint import (
    CHECKPOINT_FORMAT,
    TASK_AUTOMATIC,
    TASK_READER_ROI,
    TASKS,
    CheckpointError,
    checkpoint_task,
    load_checkpoint,
    save_checkpoint,
    validate_meta,
)
from model.serving.preprocess import PreprocessParams


@dataclass
class Payload:
    """Stands for any pickled object a weights-only load must refuse."""

    command: str


def meta(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "spine-triage-resnet50",
        "version": "1.0.0",
        "device_uid": "1.2.826.0.1.3680043.8.498.77",
        "preprocessing": PreprocessParams().to_json(),
        "threshold": 0.5,
        "training": {"epochs": 3, "patients": 20},
        "demonstration": True,
        "intended_use": "testing",
    }
    data.update(changes)
    return data


def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(16, 8, generator=generator),
        "layer.bias": torch.randn(16, generator=generator),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _write_raw(path: Path, content: object) -> None:
    """A file with a valid header and seal around arbitrary torch.save content."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    path.write_bytes(f"{CHECKPOINT_FORMAT} v1 sha256:{digest}\n".encode() + payload)


def test_round_trip_keeps_weights_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sha256 = save_checkpoint(path, weights(), meta())
    assert len(sha256) == 64
    state_dict, loaded_meta = load_checkpoint(path)
    for name, tensor in weights().items():
        assert torch.equal(state_dict[name], tensor)
        assert state_dict[name].dtype == tensor.dtype
    assert loaded_meta.pop("sha256") == sha256
    assert loaded_meta == meta()
    assert PreprocessParams.from_json(loaded_meta["preprocessing"]) == PreprocessParams()


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -1])
def test_a_modified_byte_is_refused(tmp_path: Path, where: float) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, weights(), meta())
    data = bytearray(path.read_bytes())
    index = len(data) - 1 if where == -1 else int(len(data) * where)
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_changed_tensor_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, weights(), meta())
    data = path.read_bytes()
    needle = weights()["layer.bias"].numpy().tobytes()[:8]
    position = data.index(needle)
    tampered = data[:position] + bytes([data[position] ^ 0x80]) + data[position + 1 :]
    path.write_bytes(tampered)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_even_with_a_valid_seal(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write_raw(path, {"state_dict": weights(), "meta": meta(), "extra": Payload("code")})
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("bad_meta", "message"),
    [
        ({k: v for k, v in meta().items() if k != "preprocessing"}, "preprocessing"),
        (meta(preprocessing={**PreprocessParams().to_json(), "method": "other"}), "method"),
        (meta(preprocessing={**PreprocessParams().to_json(), "clip_hu": 1000}), "unknown"),
        (meta(device_uid="not-a-uid"), "device_uid"),
        (meta(threshold=1.5), "threshold"),
        (meta(demonstration="yes"), "demonstration"),
        (meta(training=[1, 2]), "training"),
        (meta(task="localiser"), "task"),
        (meta(task=None), "task"),
    ],
)
def test_mismatched_meta_is_refused(tmp_path: Path, bad_meta: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "refused.pt", weights(), bad_meta)
    path = tmp_path / "sealed.pt"
    _write_raw(path, {"state_dict": weights(), "meta": bad_meta})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_other_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": weights(), "meta": meta()}, plain)
    with pytest.raises(CheckpointError, match="not a spine-triage checkpoint"):
        load_checkpoint(plain)
    future = tmp_path / "future.pt"
    future.write_bytes(f"{CHECKPOINT_FORMAT} v2 sha256:{'0' * 64}\n".encode())
    with pytest.raises(CheckpointError, match="version 2"):
        load_checkpoint(future)


def test_meta_must_be_plain_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", weights(), meta(training={"when": object()}))


def test_task_is_reader_roi_when_absent_and_kept_when_given(tmp_path: Path) -> None:
    assert TASKS == {TASK_READER_ROI, TASK_AUTOMATIC} == {"reader-roi", "automatic"}
    older = tmp_path / "older.pt"
    save_checkpoint(older, weights(), meta())  # a checkpoint made before tasks existed
    _, loaded = load_checkpoint(older)
    assert "task" not in loaded  # the meta is returned as written
    assert checkpoint_task(loaded) == TASK_READER_ROI
    automatic = tmp_path / "automatic.pt"
    save_checkpoint(automatic, weights(), meta(task=TASK_AUTOMATIC))
    assert checkpoint_task(load_checkpoint(automatic)[1]) == TASK_AUTOMATIC
    assert checkpoint_task(validate_meta(meta(task=TASK_READER_ROI))) == TASK_READER_ROI
    with pytest.raises(CheckpointError, match="unknown task 'segmentation'"):
        checkpoint_task({"task": "segmentation"})
