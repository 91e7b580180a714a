"""The study index: studies, series and instances as rows, kept race-free under concurrency.

``record_instance`` runs inside the caller's transaction; the C-STORE handler commits it
before it answers Success.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from pydicom import Dataset
from sqlalchemy import Connection, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from dicom_node.archive.db import DriverStatement, insert_ignore
from dicom_node.archive.lifecycle import instance_received, open_study
from dicom_node.archive.schema import Instance, Series, Study
from dicom_node.dicom.storage import StoredFile, validate_uid


@dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one instance (read from its header, never its pixels).

    The identifying UIDs are read (and validated) at once; the descriptive study and series
    fields only when a study or series row is created (:meth:`study_fields`,
    :meth:`series_fields`), which is once per study and series, not once per instance.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    frame_of_reference_uid: str | None = None
    dataset: Dataset | None = field(default=None, repr=False, compare=False)

    def study_fields(self) -> dict[str, str | None]:
        ds = self.dataset if self.dataset is not None else Dataset()
        return {
            "patient_id": _text(ds.get("PatientID"), 64),
            "patient_name": _text(ds.get("PatientName"), 324),
            "accession_number": _text(ds.get("AccessionNumber"), 16),
            "study_date": _text(ds.get("StudyDate"), 8),
            "study_description": _text(ds.get("StudyDescription"), 64),
        }

    def series_fields(self) -> dict[str, str | int | None]:
        ds = self.dataset if self.dataset is not None else Dataset()
        return {
            "modality": _text(ds.get("Modality"), 16),
            "series_number": _int(ds.get("SeriesNumber")),
            "series_description": _text(ds.get("SeriesDescription"), 64),
            "frame_of_reference_uid": self.frame_of_reference_uid,
        }


def header_from_dataset(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    """Read the identifying fields of ``ds``; raises ``InvalidUidError`` on a bad UID.

    UIDs and the instance number are read from the raw element bytes: pydicom's value
    conversion (and its validation, which these checks replace) costs more than reading
    the whole header.
    """
    frame_of_reference = _raw_text(ds, 0x00200052)
    return InstanceHeader(
        study_instance_uid=validate_uid(_raw_text(ds, 0x0020000D), "StudyInstanceUID"),
        series_instance_uid=validate_uid(_raw_text(ds, 0x0020000E), "SeriesInstanceUID"),
        sop_instance_uid=validate_uid(_raw_text(ds, 0x00080018), "SOPInstanceUID"),
        sop_class_uid=validate_uid(_raw_text(ds, 0x00080016), "SOPClassUID"),
        transfer_syntax_uid=validate_uid(transfer_syntax_uid, "TransferSyntaxUID"),
        instance_number=_int(_raw_text(ds, 0x00200013)),
        frame_of_reference_uid=(
            validate_uid(frame_of_reference, "FrameOfReferenceUID") if frame_of_reference else None
        ),
        dataset=ds,
    )


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """The value of a text element (UI, IS) as a string, without pydicom's conversion."""
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None:
        return None
    return str(value).strip("\x00 ")


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


_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)


_INSTANCE_FIELDS = (
    "series_id",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "path",
    "size",
    "sha256",
    "calling_ae",
    "received_at",
)
"""What an instance row says of its file (:func:`record_instance` binds each)."""


class _Statements:
    """The index's statements, built once per dialect: only their parameters vary per call.

    Building a statement (``insert(...).values(...)``) costs more than executing a cached
    one; the hot path executes these on the session's connection, past the ORM, and the two
    it runs for every instance past SQLAlchemy's per-call execution machinery
    (:class:`~dicom_node.archive.db.DriverStatement`).
    """

    def __init__(self, dialect: str) -> None:
        self.study_id = select(_STUDY.c.id).where(
            _STUDY.c.study_instance_uid == bindparam("study_instance_uid")
        )
        self.insert_series = insert_ignore(dialect, _SERIES, "series_instance_uid")
        self.series_id = select(_SERIES.c.id).where(
            _SERIES.c.series_instance_uid == bindparam("series_instance_uid")
        )
        self.insert_instance = DriverStatement(
            insert_ignore(dialect, _INSTANCE, "sop_instance_uid").returning(_INSTANCE.c.id),
            ("sop_instance_uid", *_INSTANCE_FIELDS),
        )
        self.existing_instance = (
            select(_INSTANCE.c.id, _INSTANCE.c.sha256, _INSTANCE.c.path)
            .where(_INSTANCE.c.sop_instance_uid == bindparam("sop_instance_uid"))
            .with_for_update()
        )
        self.replace_instance = update(_INSTANCE).where(_INSTANCE.c.id == bindparam("instance_id"))
        self.count_series = DriverStatement(
            update(_SERIES)
            .where(_SERIES.c.id == bindparam("series_id"))
            .values(instance_count=_SERIES.c.instance_count + 1)
        )


_STATEMENTS: dict[str, _Statements] = {}


def _statements(connection: Connection) -> _Statements:
    dialect = connection.dialect.name
    statements = _STATEMENTS.get(dialect)
    if statements is None:
        statements = _STATEMENTS[dialect] = _Statements(dialect)
    return statements


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


def _study_id(
    connection: Connection, sql: _Statements, header: InstanceHeader, now: datetime
) -> int:
    open_study(connection, header.study_instance_uid, header.study_fields(), now=now)
    study_id = connection.scalar(sql.study_id, {"study_instance_uid": header.study_instance_uid})
    assert study_id is not None
    return int(study_id)


def _series_id(
    connection: Connection, sql: _Statements, header: InstanceHeader, study_id: int
) -> int:
    connection.execute(
        sql.insert_series,
        {
            "study_id": study_id,
            "series_instance_uid": header.series_instance_uid,
            **header.series_fields(),
            "instance_count": 0,
        },
    )
    series_id = connection.scalar(
        sql.series_id, {"series_instance_uid": header.series_instance_uid}
    )
    assert series_id is not None
    return int(series_id)


def record_instance(
    connection: Connection,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae: str | None,
    now: datetime,
    known: KnownIds | None = None,
) -> RecordResult:
    """Index one stored instance; (re)opens its study. Runs in the caller's transaction.

    ``known`` holds the ids of studies and series already committed (filled by the caller
    after its commit): for the second and later instances of a series, a new instance is
    three statements — insert it, count it in its series, touch its study.
    """
    sql = _statements(connection)
    study_id = known.studies.get(header.study_instance_uid) if known else None
    if study_id is None:
        study_id = _study_id(connection, sql, header, now)
    series_id = known.series.get(header.series_instance_uid) if known else None
    if series_id is None:
        series_id = _series_id(connection, sql, header, study_id)

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
    inserted = sql.insert_instance.execute(
        connection, {"sop_instance_uid": header.sop_instance_uid, **current}
    ).first()
    if inserted is not None:
        sql.count_series.execute(connection, {"series_id": series_id})
        outcome, previous = RecordOutcome.NEW, None
    else:  # the SOP Instance UID is known: the same bytes again, or newer content
        existing = connection.execute(
            sql.existing_instance, {"sop_instance_uid": header.sop_instance_uid}
        ).one()
        if existing.sha256 == stored.sha256:
            outcome, previous = RecordOutcome.IDENTICAL, None
        else:
            connection.execute(sql.replace_instance.values(**current), {"instance_id": existing.id})
            outcome, previous = RecordOutcome.REPLACED, existing.path

    instance_received(connection, study_id, now=now, new=outcome is RecordOutcome.NEW)
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
