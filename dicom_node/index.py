"""The study index: studies, series and instances as rows, kept race-free under concurrency.

``record_instance`` runs inside the caller's transaction; the C-STORE handler commits it
before it answers Success.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_node.schema import Instance, Series, Study, StudyState
from dicom_node.storage import StoredFile, validate_uid


@dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one instance (read from its header, never its pixels)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    instance_number: int | None = None
    series_number: int | None = None
    series_description: str | None = None
    frame_of_reference_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None


def header_from_dataset(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    """Read the index fields of ``ds``; raises ``InvalidUidError`` on a bad UID."""
    frame_of_reference = ds.get("FrameOfReferenceUID")
    return InstanceHeader(
        study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOPClassUID"),
        transfer_syntax_uid=validate_uid(transfer_syntax_uid, "TransferSyntaxUID"),
        modality=_text(ds.get("Modality"), 16),
        instance_number=_int(ds.get("InstanceNumber")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds.get("SeriesDescription"), 64),
        frame_of_reference_uid=(
            validate_uid(frame_of_reference, "FrameOfReferenceUID") if frame_of_reference else None
        ),
        patient_id=_text(ds.get("PatientID"), 64),
        patient_name=_text(ds.get("PatientName"), 324),
        accession_number=_text(ds.get("AccessionNumber"), 16),
        study_date=_text(ds.get("StudyDate"), 8),
        study_description=_text(ds.get("StudyDescription"), 64),
    )


def _text(value: Any, limit: int) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class RecordOutcome(enum.Enum):
    NEW = "new"
    IDENTICAL = "identical"  # the same bytes were already stored
    REPLACED = "replaced"  # same SOP Instance UID, other content: the newest wins


@dataclass(frozen=True)
class RecordResult:
    outcome: RecordOutcome
    study_id: int
    series_id: int
    previous_path: str | None  # file the index no longer points at (REPLACED), to remove


def _insert_ignore(session: Session, table: Any, values: dict[str, Any], key: str) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = (
            postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
        )
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
    else:  # pragma: no cover - only PostgreSQL and SQLite are supported
        raise RuntimeError(f"unsupported database {dialect}")
    session.execute(stmt)


@dataclass
class KnownIds:
    """Ids of committed study and series rows, per process (rows are never renumbered)."""

    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    limit: int = 10_000

    def remember(self, header: InstanceHeader, result: RecordResult) -> None:
        if len(self.series) > self.limit:  # a long-running node: start afresh
            self.studies.clear()
            self.series.clear()
        self.studies[header.study_instance_uid] = result.study_id
        self.series[header.series_instance_uid] = result.series_id


def _study_id(session: Session, header: InstanceHeader, now: datetime) -> int:
    _insert_ignore(
        session,
        Study.__table__,
        {
            "study_instance_uid": header.study_instance_uid,
            "patient_id": header.patient_id,
            "patient_name": header.patient_name,
            "accession_number": header.accession_number,
            "study_date": header.study_date,
            "study_description": header.study_description,
            "state": StudyState.RECEIVING.value,
            "instance_count": 0,
            "first_received_at": now,
            "last_received_at": now,
            "completion_count": 0,
        },
        "study_instance_uid",
    )
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == header.study_instance_uid)
    )
    assert study_id is not None
    return study_id


def _series_id(session: Session, header: InstanceHeader, study_id: int) -> int:
    _insert_ignore(
        session,
        Series.__table__,
        {
            "study_id": study_id,
            "series_instance_uid": header.series_instance_uid,
            "modality": header.modality,
            "series_number": header.series_number,
            "series_description": header.series_description,
            "frame_of_reference_uid": header.frame_of_reference_uid,
            "instance_count": 0,
        },
        "series_instance_uid",
    )
    series_id = session.scalar(
        select(Series.id).where(Series.series_instance_uid == header.series_instance_uid)
    )
    assert series_id is not None
    return series_id


def record_instance(
    session: Session,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae: str | None,
    now: datetime,
    known: KnownIds | None = None,
) -> RecordResult:
    """Index one stored instance; (re)opens its study. Runs in the caller's transaction.

    ``known`` holds the ids of studies and series already committed (filled by the caller
    after its commit): for the second and later instances of a series, two statements fewer
    each for the study and the series.
    """
    study_id = known.studies.get(header.study_instance_uid) if known else None
    if study_id is None:
        study_id = _study_id(session, header, now)
    series_id = known.series.get(header.series_instance_uid) if known else None
    if series_id is None:
        series_id = _series_id(session, header, study_id)

    existing = session.execute(
        select(Instance.id, Instance.sha256, Instance.path)
        .where(Instance.sop_instance_uid == header.sop_instance_uid)
        .with_for_update()
    ).one_or_none()

    # what the row says of the file now (new instance, or newer content of a known one)
    current: dict[str, Any] = {
        "series_id": series_id,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": stored.relative_path,
        "size": stored.size,
        "sha256": stored.sha256,
        "calling_ae": calling_ae,
        "received_at": now,
    }
    if existing is None:
        session.execute(
            insert(Instance).values(sop_instance_uid=header.sop_instance_uid, **current)
        )
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(instance_count=Series.instance_count + 1)
        )
        outcome, previous = RecordOutcome.NEW, None
    elif existing.sha256 == stored.sha256:
        outcome, previous = RecordOutcome.IDENTICAL, None
    else:
        session.execute(update(Instance).where(Instance.id == existing.id).values(**current))
        outcome, previous = RecordOutcome.REPLACED, existing.path

    # Any arrival (re)opens the study: completion is a quiet period after the last one.
    values: dict[str, Any] = {
        "last_received_at": now,
        "state": StudyState.RECEIVING,
    }
    if outcome is RecordOutcome.NEW:
        values["instance_count"] = Study.instance_count + 1
    session.execute(update(Study).where(Study.id == study_id).values(**values))
    return RecordResult(
        outcome=outcome, study_id=study_id, series_id=series_id, previous_path=previous
    )


def count_instances(session: Session, study_instance_uid: str) -> int:
    return int(
        session.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
        )
        or 0
    )
