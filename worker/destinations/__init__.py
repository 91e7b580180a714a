"""Where results go: PACS (C-STORE, STOW-RS), worklists (HL7, Orthanc metadata), webhooks.

Every destination implements :class:`Destination`: ``send(payload)`` returns when the peer
accepted the result, raises :class:`~worker.errors.TransientError` when a later attempt may
succeed (peer down, timeout) and :class:`~worker.errors.PermanentError` when it cannot (a
refusal that will not change). The outbox in :mod:`worker.delivery` does the retrying, so a
destination never loops or sleeps itself. Sending the same payload twice must be harmless
(the SR's and the review images' SOP Instance UIDs are deterministic; flags are set, not
toggled).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class DeliveryPayload:
    """Everything a destination needs about one result (read from the database)."""

    delivery_id: int
    result_id: int
    attempt: int  # 1 for the first attempt
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    sr_path: Path  # absolute path of the SR file (DICOM Part 10)
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    patient_probability: float
    slice_x_mm: tuple[float, ...]
    slice_probabilities: tuple[float, ...]
    label: str  # "malignant" | "benign"
    priority: str  # "HIGH" | "ROUTINE"
    threshold: float
    model_name: str
    model_version: str
    demonstration: bool
    vertebra: str | None
    result_created_at: datetime
    # The review series' files (absolute), sent before the SR that draws on them (PACS
    # destinations); empty when the site sends none.
    review_paths: tuple[Path, ...] = ()


class Destination(Protocol):
    """One configured destination."""

    name: str
    kind: str

    def send(self, payload: DeliveryPayload) -> None:
        """Deliver ``payload`` or raise TransientError / PermanentError."""
        ...
