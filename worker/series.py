"""The series a triage job reads: its stored images, retrieved from the PACS by WADO-RS first
when the node never received it, and checked against the site's series-selection rules.

A retrieved series goes through the node's durable ingest path, as a received one does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.schema import Instance, Series, Study, StudyState
from dicom_node.dicom.ingest import SR_SOP_CLASSES
from worker.errors import PermanentError, TransientError
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class SeriesNotReceived(PermanentError):
    def __init__(self, study_instance_uid: str, series_instance_uid: str) -> None:
        super().__init__(
            f"series {series_instance_uid} of study {study_instance_uid} was not received"
        )
        self.study_instance_uid = study_instance_uid
        self.series_instance_uid = series_instance_uid


def stored_image_paths(
    session: Session, study_instance_uid: str, series_instance_uid: str
) -> Sequence[str]:
    """The stored paths of the series' instances other than SRs (raises
    :class:`SeriesNotReceived` when the node holds no such series)."""
    series = session.scalar(
        select(Series)
        .join(Study, Series.study_id == Study.id)
        .where(
            Series.series_instance_uid == series_instance_uid,
            Study.study_instance_uid == study_instance_uid,
        )
    )
    if series is None:
        raise SeriesNotReceived(study_instance_uid, series_instance_uid)
    return session.scalars(
        select(Instance.path).where(
            Instance.series_id == series.id,
            Instance.sop_class_uid.not_in([str(uid) for uid in SR_SOP_CLASSES]),
        )
    ).all()


def retrieve_series(rt: WorkerRuntime, study_uid: str, series_uid: str) -> None:
    """WADO-RS from the configured source into storage, through the durable ingest path."""
    from dicom_node.dicom.dicomweb import DicomwebEndpoint, DicomwebError, DicomwebPeer
    from dicom_node.dicom.ingest import StoreContext, StoreOutcome, store_instance

    settings = rt.settings
    endpoint = DicomwebEndpoint(
        url=settings.dicomweb_source_url,
        username=settings.dicomweb_source_username or None,
        password=settings.dicomweb_source_password or None,
        bearer_token=settings.dicomweb_source_bearer_token or None,
    )
    context = StoreContext(store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine))
    refused: list[StoreOutcome] = []

    def store(data: bytes) -> None:
        outcome = store_instance(context, data, transfer_syntax=None, source="WADO-RS")
        if not outcome.ok:
            refused.append(outcome)

    try:
        with DicomwebPeer(endpoint) as peer:
            count = peer.retrieve_series(study_uid, series_uid, store)
    except DicomwebError as exc:
        error = TransientError if exc.transient else PermanentError
        raise error(f"retrieving series {series_uid} by WADO-RS: {exc}") from exc
    if refused:
        raise TransientError(f"{len(refused)} retrieved instance(s) could not be stored")
    if count == 0:
        raise PermanentError(f"series {series_uid} not found at the DICOMweb source")
    with transaction(rt.sessions) as session:  # retrieved whole: complete by construction
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == study_uid)
            .values(state=StudyState.COMPLETE, completed_at=datetime.now(UTC))
        )
    log.info("retrieved %d instance(s) of series %s by WADO-RS", count, series_uid)


def check_series_selection(path: Path, rules: list[str]) -> None:
    """The series must meet the site's selection rules (``KEY=REGEX``, case-insensitive)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise PermanentError(f"stored image cannot be read: {type(exc).__name__}") from exc
    for rule in rules:
        keyword, _, pattern = rule.partition("=")
        value = header.get(keyword.strip())
        text = (
            "\\".join(str(v) for v in value)
            if isinstance(value, list | tuple)
            else str(value if value is not None else "")
        )
        if not re.search(pattern.strip(), text, flags=re.IGNORECASE):
            raise PermanentError(
                f"series does not meet the selection rule {rule!r} (found {keyword}={text!r})"
            )
