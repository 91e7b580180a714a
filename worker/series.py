"""The series a triage job reads, as one value: its stored files and their headers, read once.

A job finds the series' stored images in the index (or retrieves them from the PACS by WADO-RS
first, through the node's durable ingest path, when the node never received them), reads
every file's header once, checks the site's selection rules on them and validates the
geometry from them. The volume, the SR's evidence and the selection rules all use these
headers: no file's header is read twice by a job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.schema import Instance, Study
from dicom_node.archive.schema import Series as SeriesRow
from dicom_node.dicom.dicomweb import DicomwebEndpoint, DicomwebError, DicomwebPeer
from dicom_node.dicom.ingest import SR_SOP_CLASSES, StoreContext, StoreOutcome, store_instance
from model.io.volume import SeriesError, SeriesGeometry, read_headers, read_series_geometry
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


@dataclass(frozen=True)
class Series:
    """One image series on disk: its files, their headers (in the same order) and its
    validated geometry."""

    study_instance_uid: str
    series_instance_uid: str
    paths: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    geometry: SeriesGeometry

    def headers_of(self, sop_instance_uids: Sequence[str]) -> list[Dataset]:
        """The headers of the named instances, in the series' order."""
        wanted = set(sop_instance_uids)
        return [header for header in self.headers if header.SOPInstanceUID in wanted]


def open_series(rt: WorkerRuntime, study_instance_uid: str, series_instance_uid: str) -> Series:
    """The stored series (retrieved by WADO-RS first when the node never received it and a
    source is configured), its headers read once and checked against the selection rules."""
    try:
        paths = _stored_paths(rt, study_instance_uid, series_instance_uid)
    except SeriesNotReceived:
        if not rt.settings.dicomweb_source_url:
            raise
        retrieve_series(rt, study_instance_uid, series_instance_uid)
        paths = _stored_paths(rt, study_instance_uid, series_instance_uid)
    return read_series(paths, study_instance_uid, series_instance_uid, rt.settings.series_selection)


def read_series(
    paths: Sequence[Path],
    study_instance_uid: str,
    series_instance_uid: str,
    selection: list[str],
) -> Series:
    """The series of ``paths``: headers read once, checked against the selection rules,
    geometry validated (:class:`PermanentError` says what is wrong)."""
    if not paths:
        raise PermanentError(f"series {series_instance_uid} holds no image")
    try:
        headers = read_headers(paths)
        check_series_selection(headers[0], selection)
        geometry = read_series_geometry(paths, headers)
    except SeriesError as exc:
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
    return Series(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        paths=tuple(paths),
        headers=tuple(headers),
        geometry=geometry,
    )


def _stored_paths(rt: WorkerRuntime, study_uid: str, series_uid: str) -> list[Path]:
    with rt.sessions() as session:
        return [
            rt.store.absolute(path) for path in stored_image_paths(session, study_uid, series_uid)
        ]


def stored_image_paths(
    session: Session, study_instance_uid: str, series_instance_uid: str
) -> Sequence[str]:
    """The stored paths of the series' instances other than SRs (raises
    :class:`SeriesNotReceived` when the node holds no such series)."""
    series = session.scalar(
        select(SeriesRow)
        .join(Study, SeriesRow.study_id == Study.id)
        .where(
            SeriesRow.series_instance_uid == series_instance_uid,
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
        lifecycle.complete_retrieved_study(session, study_uid, now=datetime.now(UTC))
    log.info("retrieved %d instance(s) of series %s by WADO-RS", count, series_uid)


def check_series_selection(header: Dataset, rules: list[str]) -> None:
    """The series must meet the site's selection rules (``KEY=REGEX``, case-insensitive)."""
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
