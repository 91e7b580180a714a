"""Checkpoints: a ``state_dict`` plus a plain, JSON-able ``meta`` dict, sealed by a sha256.

File layout: one header line ``spine-triage-checkpoint v1 sha256:<64 hex>`` followed by the
bytes :func:`torch.save` wrote for ``{"state_dict": ..., "meta": ...}``. Loading checks the
sha256 of those bytes before anything is deserialised, then reads them with
``torch.load(weights_only=True)`` (no pickled code): any modified byte is refused. The meta
must hold what serving needs — above all the preprocessing parameters, so that a checkpoint is
never served with a preprocessing other than the one it was trained with.

``meta["task"]`` says what the model was trained to tell apart (:data:`TASKS`):

- ``reader-roi``: malignant vs benign fracture on a reader's ROI on the most abnormal
  vertebra, the paper's protocol; what a checkpoint without ``task`` (an older one) is;
- ``automatic``: malignant vs benign fracture or normal vertebral body, trained with ROIs on
  normal bodies as well, so the maximum over every body a localiser proposes is meaningful;
  valid on reader ROIs too.

``meta["domain"]`` (optional; a checkpoint without it has no out-of-domain guard) describes
the training inputs as :mod:`model.serving.domain` fits them; its arrays are stored beside the
weights under ``"domain"`` in the same sealed payload, and the description records their
sha256: a description that does not match its arrays, or arrays without a description, are
refused like any other damage.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.serving.domain import DomainError, DomainModel
from model.serving.preprocess import PreprocessParams, PreprocessParamsError
from model.serving.roi import is_dicom_uid

CHECKPOINT_FORMAT = "spine-triage-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.5
TASK_READER_ROI = "reader-roi"
TASK_AUTOMATIC = "automatic"
TASKS = frozenset({TASK_READER_ROI, TASK_AUTOMATIC})
REQUIRED_META_KEYS = (
    "name",
    "version",
    "device_uid",
    "preprocessing",
    "threshold",
    "training",
    "demonstration",
    "intended_use",
)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, was modified, or its meta is incomplete or invalid."""


def _canonical_json(meta: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"meta: not plain JSON data ({exc})") from exc


def checkpoint_task(meta: Mapping[str, Any]) -> str:
    """The task a checkpoint's meta says it was trained for; ``reader-roi`` when absent.

    :class:`CheckpointError` for a value that is not one of :data:`TASKS`.
    """
    task = meta.get("task", TASK_READER_ROI)
    if not isinstance(task, str) or task not in TASKS:
        raise CheckpointError(
            f"meta.task: unknown task {task!r} (expected one of {', '.join(sorted(TASKS))})"
        )
    return task


def validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Check the meta dict serving relies on; returns a plain copy. :class:`CheckpointError`."""
    if not isinstance(meta, Mapping):
        raise CheckpointError("meta: expected a dict")
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"meta: missing key(s) {', '.join(missing)}")
    for key in ("name", "version", "intended_use"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise CheckpointError(f"meta.{key}: expected a non-empty string")
    if not is_dicom_uid(meta["device_uid"]):
        raise CheckpointError(f"meta.device_uid: not a DICOM UID: {meta['device_uid']!r}")
    threshold = meta["threshold"]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or not 0.0 < threshold < 1.0
    ):
        raise CheckpointError(f"meta.threshold: expected a number in (0, 1), got {threshold!r}")
    if not isinstance(meta["training"], Mapping):
        raise CheckpointError("meta.training: expected a dict (training summary)")
    if not isinstance(meta["demonstration"], bool):
        raise CheckpointError("meta.demonstration: expected true or false")
    checkpoint_task(meta)
    if not isinstance(meta["preprocessing"], Mapping):
        raise CheckpointError("meta.preprocessing: expected a dict")
    try:
        PreprocessParams.from_json(meta["preprocessing"])
    except (PreprocessParamsError, TypeError) as exc:
        raise CheckpointError(f"meta.preprocessing: {exc}") from exc
    plain: dict[str, Any] = json.loads(_canonical_json(meta))
    return plain


def domain_of(meta: Mapping[str, Any], arrays: Mapping[str, Any] | None) -> DomainModel | None:
    """The domain description of a checkpoint (None when it has none); :class:`CheckpointError`
    when meta and arrays do not agree."""
    if "domain" not in meta:
        if arrays:
            raise CheckpointError("domain arrays without a meta.domain description")
        return None
    plain = {name: np.asarray(_as_numpy(value)) for name, value in (arrays or {}).items()}
    try:
        return DomainModel.from_checkpoint(meta["domain"], plain)
    except DomainError as exc:
        raise CheckpointError(f"out-of-domain guard: {exc}") from exc


def _as_numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True, eq=False)
class LoadedCheckpoint:
    """A verified checkpoint: the network's weights, its meta, its domain (or None)."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    domain: DomainModel | None


def _header(sha256: str) -> bytes:
    return f"{CHECKPOINT_FORMAT} v{CHECKPOINT_FORMAT_VERSION} sha256:{sha256}\n".encode()


def save_checkpoint(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    domain_arrays: Mapping[str, np.ndarray] | None = None,
) -> str:
    """Write a checkpoint atomically; returns the sha256 of its payload (also in its header).

    ``domain_arrays`` are the arrays ``meta["domain"]`` describes (see :mod:`.domain`)."""
    plain_meta = validate_meta(meta)
    domain_of(plain_meta, domain_arrays)
    weights = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict[{name!r}]: not a tensor")
        weights[name] = tensor.detach().to("cpu").clone()
    buffer = io.BytesIO()
    content: dict[str, Any] = {"state_dict": weights, "meta": plain_meta}
    if domain_arrays:
        content["domain"] = {
            name: torch.from_numpy(np.asarray(array, dtype=np.float32).copy())
            for name, array in domain_arrays.items()
        }
    torch.save(content, buffer)
    payload = buffer.getvalue()
    sha256 = hashlib.sha256(payload).hexdigest()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(_header(sha256))
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return sha256


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: verify its sha256, ``torch.load(weights_only=True)``, check its meta.

    Returns ``(state_dict, meta)``; ``meta["sha256"]`` is set to the verified digest.
    Raises :class:`CheckpointError` for an unreadable, modified or incomplete file.
    """
    loaded = read_checkpoint(path)
    return loaded.state_dict, loaded.meta


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """:func:`load_checkpoint` with the domain description (checked against its arrays)."""
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\n", 0, 200)
    prefix = f"{CHECKPOINT_FORMAT} v".encode()
    if newline < 0 or not data.startswith(prefix):
        raise CheckpointError(f"{path.name}: not a spine-triage checkpoint")
    try:
        version_text, _, recorded = (
            data[len(prefix) : newline].decode("ascii").partition(" sha256:")
        )
        version = int(version_text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: damaged checkpoint header") from exc
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name}: checkpoint format version {version}, this code reads "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    payload = data[newline + 1 :]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != recorded:
        raise CheckpointError(
            f"{path.name}: content does not match its sha256 (recorded {recorded[:12]}…, "
            f"actual {actual[:12]}…): the file was modified or damaged"
        )
    try:
        content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a payload it cannot read
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc})") from exc
    state_dict = content.get("state_dict") if isinstance(content, dict) else None
    meta = content.get("meta") if isinstance(content, dict) else None
    if not isinstance(state_dict, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path.name}: incomplete checkpoint (state_dict and meta needed)")
    if not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path.name}: state_dict holds something other than tensors")
    plain_meta = validate_meta(meta)
    arrays = content.get("domain")
    if arrays is not None and not (
        isinstance(arrays, dict) and all(isinstance(t, torch.Tensor) for t in arrays.values())
    ):
        raise CheckpointError(f"{path.name}: domain arrays hold something other than tensors")
    try:
        domain = domain_of(plain_meta, arrays)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    plain_meta["sha256"] = actual
    return LoadedCheckpoint(dict(state_dict), plain_meta, domain)
