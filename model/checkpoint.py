"""Checkpoints: a ``state_dict`` plus a plain, JSON-able ``meta`` dict, sealed by a sha256.

The file is written with :func:`torch.save` and read with ``torch.load(weights_only=True)``
(no pickled code). It holds the weights, the meta dict and the sha256 of both (tensor names,
dtypes, shapes and bytes, then the meta as canonical JSON); loading recomputes the digest and
refuses a file whose content was modified, and refuses meta that lacks what serving needs —
above all the preprocessing parameters, so that a checkpoint is never served with a
preprocessing other than the one it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.preprocess import PreprocessParams, PreprocessParamsError
from model.roi import is_dicom_uid

CHECKPOINT_FORMAT = "spine-triage-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.5
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


def content_sha256(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """The sha256 of a checkpoint's content: every tensor (name, dtype, shape, bytes), then meta."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict[{name!r}]: not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        digest.update(len(data).to_bytes(8, "little") + data)
    digest.update(_canonical_json(meta))
    return digest.hexdigest()


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
    if not isinstance(meta["preprocessing"], Mapping):
        raise CheckpointError("meta.preprocessing: expected a dict")
    try:
        PreprocessParams.from_json(meta["preprocessing"])
    except (PreprocessParamsError, TypeError) as exc:
        raise CheckpointError(f"meta.preprocessing: {exc}") from exc
    plain: dict[str, Any] = json.loads(_canonical_json(meta))
    return plain


def save_checkpoint(
    path: Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> str:
    """Write a checkpoint atomically; returns its content sha256 (also stored inside)."""
    plain_meta = validate_meta(meta)
    weights = {name: tensor.detach().to("cpu").clone() for name, tensor in state_dict.items()}
    sha256 = content_sha256(weights, plain_meta)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": weights,
        "meta": plain_meta,
        "sha256": sha256,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return sha256


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint (``weights_only=True``), verify its sha256 and meta.

    Returns ``(state_dict, meta)``; ``meta["sha256"]`` is set to the verified digest.
    Raises :class:`CheckpointError` for an unreadable, modified or incomplete file.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path.name}: not a spine-triage checkpoint")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name}: checkpoint format version {payload.get('format_version')!r}, "
            f"this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    state_dict, meta, recorded = (
        payload.get("state_dict"),
        payload.get("meta"),
        payload.get("sha256"),
    )
    if (
        not isinstance(state_dict, dict)
        or not isinstance(meta, dict)
        or not isinstance(recorded, str)
    ):
        raise CheckpointError(f"{path.name}: incomplete checkpoint")
    actual = content_sha256(state_dict, meta)
    if actual != recorded:
        raise CheckpointError(
            f"{path.name}: content does not match its sha256 (recorded {recorded[:12]}…, "
            f"actual {actual[:12]}…): the file was modified or damaged"
        )
    plain_meta = validate_meta(meta)
    plain_meta["sha256"] = actual
    return dict(state_dict), plain_meta
