"""The worker's audit events: start and stop, and each result sent to a destination.

A result's SR and the derived images before it (review series, key image) sent to a PACS
(C-STORE, STOW-RS) or written to a results folder are *DICOM Instances Transferred*
(PS3.15 A.5.3.7, action R), with the instances counted per SOP class; a result sent to a
system that takes no DICOM objects (HL7 ORU, Orthanc metadata, a webhook) carries the
patient's identity and finding out of the node's control: an *Export* (A.5.3.4).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread

from dicom_node.audit import messages
from dicom_node.audit.messages import StudyRef
from dicom_node.settings import DestinationSettings
from worker.destinations import DeliveryPayload

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

DICOM_KINDS = frozenset({"cstore", "stow", "folder"})


def _sop_classes(paths: list[Path]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            counts[str(ds.SOPClassUID)] += 1
        except Exception:  # an unreadable file is counted, not named
            counts["unknown"] += 1
    return dict(counts)


def _address(config: DestinationSettings | None) -> str | None:
    if config is None:
        return None
    host = getattr(config, "host", None)
    if host:
        return str(host)
    url = getattr(config, "url", None)
    if url:
        from urllib.parse import urlsplit

        return urlsplit(str(url)).hostname
    return None


def delivery_sent(rt: WorkerRuntime, payload: DeliveryPayload, destination: str) -> None:
    """Audit one delivered result (never raises into the delivery)."""
    try:
        config = next((d for d in rt.settings.destinations if d.name == destination), None)
        kind = config.kind if config is not None else "unknown"
        files: list[Path] = [*payload.review_paths]
        key_image = getattr(payload, "key_image_path", None)
        if key_image is not None:
            files.append(key_image)
        if payload.sr_path is not None:
            files.append(payload.sr_path)
        ref = StudyRef(
            study_instance_uid=payload.study_instance_uid,
            patient_id=payload.patient_id,
            patient_name=payload.patient_name,
            accession_number=payload.accession_number,
            sop_classes=_sop_classes(files) if kind in DICOM_KINDS else {},
        )
        trail = rt.audit
        if kind in DICOM_KINDS:
            record = messages.instances_sent(
                trail.source,
                ref,
                sender=rt.settings.ae_title,
                destination=destination,
                destination_address=_address(config),
            )
        else:
            record = messages.export(
                trail.source,
                [ref],
                user=rt.settings.ae_title,
                client_address=None,
                destination=f"{destination} ({kind})",
            )
        trail.record(record)
    except Exception as exc:
        log.error(
            "delivery %d: audit event not recorded (%s)", payload.delivery_id, type(exc).__name__
        )
