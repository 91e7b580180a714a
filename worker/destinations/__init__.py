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

from worker.errors import TransientError

# The destinations that receive the report (the SR and the images before it); the others are
# flag sinks (HL7, Orthanc metadata, webhook), which need only the result and the SR's UIDs:
# an automatic job sends them the moment its result is recorded, before the report is built.
REPORT_KINDS = frozenset({"cstore", "stow", "folder"})


def carries_report(kind: str) -> bool:
    """Whether a destination of ``kind`` receives the SR (and waits for it to be written)."""
    return kind in REPORT_KINDS


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
    # Absolute path of the SR file (DICOM Part 10); None while the report is being written
    # (a flag sink may be sent before it: it needs only the SR's UIDs).
    sr_path: Path | None
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
    # The key image (absolute), sent after the review series and before the SR that
    # references it; None when the site sends none.
    key_image_path: Path | None = None

    def report_files(self) -> list[Path]:
        """The files a PACS destination sends, in order: the review images, the key image,
        then the SR that references them. Refuses while the report is not written yet."""
        if self.sr_path is None:
            raise TransientError(f"result {self.result_id}: the report is not written yet")
        key = [self.key_image_path] if self.key_image_path is not None else []
        return [*self.review_paths, *key, self.sr_path]


class Destination(Protocol):
    """One configured destination."""

    name: str
    kind: str

    def send(self, payload: DeliveryPayload) -> None:
        """Deliver ``payload`` or raise TransientError / PermanentError."""
        ...
