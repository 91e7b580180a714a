"""ROI annotations arriving by REST, DICOM SR or CSV: validated once, stored as pending work.

The ROI JSON is the one METHOD.md defines. Validation here is the edge's (types, UIDs, finite
numbers, a polygon with an area); the model checks the ROI against the volume when it runs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.archive.schema import AnnotationState, Instance, RoiAnnotation
from dicom_node.dicom.sr_roi import RoiSrError, extract_roi, is_roi_report
from dicom_node.dicom.storage import InvalidUidError, validate_uid

log = logging.getLogger(__name__)

MAX_SLICES = 7


class RoiIn(BaseModel):
    """An ROI annotation as submitted (REST body, CSV row, SR content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_instance_uid: str = Field(description="Study Instance UID of the CT study")
    series_instance_uid: str = Field(description="Series Instance UID of the CT series")
    slices_x_mm: list[float] = Field(
        min_length=1,
        max_length=MAX_SLICES,
        description="Lateral positions (patient x, LPS, mm) of the sagittal slices that show "
        "the abnormality (the method uses 3-5)",
    )
    polygon_yz_mm: list[tuple[float, float]] = Field(
        min_length=3,
        max_length=1024,
        description="The ROI polygon in the sagittal plane: (y, z) points in mm (LPS)",
    )
    vertebra: str | None = Field(
        None, max_length=16, description="Vertebra label, e.g. L1 (optional)"
    )
    annotator: str | None = Field(
        None, max_length=128, description="Who drew the ROI (optional; never logged)"
    )

    @field_validator("study_instance_uid", "series_instance_uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        try:
            return validate_uid(value)
        except InvalidUidError as exc:
            raise ValueError("not a valid DICOM UID") from exc

    @field_validator("slices_x_mm")
    @classmethod
    def _finite_slices(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in value):
            raise ValueError("slice positions must be finite numbers")
        if len({round(x, 3) for x in value}) != len(value):
            raise ValueError("slice positions must be distinct")
        return value

    @field_validator("polygon_yz_mm")
    @classmethod
    def _polygon(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if not all(math.isfinite(c) for point in value for c in point):
            raise ValueError("polygon coordinates must be finite numbers")
        if _polygon_area(value) <= 1e-6:
            raise ValueError("polygon has no area (points coincide or lie on a line)")
        return value

    @model_validator(mode="after")
    def _vertebra_label(self) -> RoiIn:
        if self.vertebra is not None and not self.vertebra.strip():
            raise ValueError("vertebra, when given, must not be empty")
        return self


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    total = 0.0
    for (y0, z0), (y1, z1) in zip(points, [*points[1:], points[0]], strict=True):
        total += y0 * z1 - y1 * z0
    return abs(total) / 2.0


@dataclass(frozen=True)
class StoredAnnotation:
    id: int
    created: bool  # False: the same source object was already stored (idempotent re-send)


def create_annotation(
    session: Session,
    roi: RoiIn,
    *,
    source: str,
    source_key: str | None = None,
    now: datetime | None = None,
) -> StoredAnnotation:
    """Store a pending annotation (in the caller's transaction); idempotent on ``source_key``."""
    if source_key is not None:
        existing = session.scalar(
            select(RoiAnnotation.id).where(RoiAnnotation.source_key == source_key)
        )
        if existing is not None:
            return StoredAnnotation(existing, created=False)
    moment = now or datetime.now(UTC)
    row = RoiAnnotation(
        study_instance_uid=roi.study_instance_uid,
        series_instance_uid=roi.series_instance_uid,
        slices_x_mm=[float(x) for x in roi.slices_x_mm],
        polygon_yz_mm=[[float(y), float(z)] for y, z in roi.polygon_yz_mm],
        vertebra=roi.vertebra,
        annotator=roi.annotator,
        source=source,
        source_key=source_key,
        state=AnnotationState.PENDING,
        attempts=0,
        created_at=moment,
        updated_at=moment,
    )
    session.add(row)
    session.flush()
    log.info("annotation %d stored (%s) for study %s", row.id, source, roi.study_instance_uid)
    return StoredAnnotation(row.id, created=True)


# --- DICOM SR --------------------------------------------------------------------------


def annotation_from_sr(session: Session, ds: Dataset, storage_root: Path) -> int | None:
    """Turn a received TID 1500 ROI report into a pending annotation, if it is one.

    Called by the C-STORE handler inside the indexing transaction. An SR that is not an ROI
    report (or is malformed) is stored like any instance and only logged: the sender did
    nothing wrong by sending it.
    """
    if not is_roi_report(ds):
        return None

    def resolve_image(sop_instance_uid: str) -> Dataset | None:
        path = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
        if path is None:
            return None
        return dcmread(storage_root / path, stop_before_pixels=True)

    try:
        roi = extract_roi(ds, resolve_image)
        data = roi.to_json()
        annotator = data.pop("annotator", None)
        roi_in = RoiIn(**data, annotator=annotator)
    except (RoiSrError, ValidationError) as exc:
        log.warning(
            "SR %s holds no usable ROI: %s", ds.get("SOPInstanceUID", "?"), _first_line(exc)
        )
        return None
    stored = create_annotation(
        session, roi_in, source="sr", source_key=f"sr:{roi.sr_sop_instance_uid}"
    )
    return stored.id


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- CSV -------------------------------------------------------------------------------

CSV_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "slices_x_mm",
    "polygon_yz_mm",
    "vertebra",
    "annotator",
)


class CsvImportError(ValueError):
    """Rows that cannot be imported; nothing was imported."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_csv(text: str) -> list[RoiIn]:
    """Every row validated; raises :class:`CsvImportError` listing all problems by row.

    Columns: ``study_instance_uid, series_instance_uid, slices_x_mm, polygon_yz_mm`` and the
    optional ``vertebra, annotator``. ``slices_x_mm`` is a JSON list or numbers separated by
    ``;``; ``polygon_yz_mm`` a JSON list of [y, z] pairs or ``y z;y z;...``.
    """
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    required = CSV_COLUMNS[:4]
    absent = [column for column in required if column not in header]
    if absent:
        raise CsvImportError([f"header: missing column(s) {', '.join(absent)}"])
    unknown = [column for column in header if column not in CSV_COLUMNS]
    if unknown:
        raise CsvImportError([f"header: unknown column(s) {', '.join(unknown)}"])
    rows: list[RoiIn] = []
    problems: list[str] = []
    for number, record in enumerate(reader, start=2):  # row 1 is the header
        try:
            rows.append(
                RoiIn(
                    study_instance_uid=(record.get("study_instance_uid") or "").strip(),
                    series_instance_uid=(record.get("series_instance_uid") or "").strip(),
                    slices_x_mm=_numbers(record.get("slices_x_mm") or ""),
                    polygon_yz_mm=_points(record.get("polygon_yz_mm") or ""),
                    vertebra=(record.get("vertebra") or "").strip() or None,
                    annotator=(record.get("annotator") or "").strip() or None,
                )
            )
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "row"
                problems.append(f"row {number}: {where}: {error['msg']}")
        except ValueError as exc:
            problems.append(f"row {number}: {exc}")
    if problems:
        raise CsvImportError(problems)
    if not rows:
        raise CsvImportError(["no data rows"])
    return rows


def _numbers(text: str) -> list[float]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError("slices_x_mm: expected a list")
        return [float(x) for x in value]
    try:
        return [float(part) for part in text.replace(",", ";").split(";") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"slices_x_mm: {exc}") from exc


def _points(text: str) -> list[tuple[float, float]]:
    text = text.strip()
    try:
        if text.startswith("["):
            value = json.loads(text)
            return [(float(p[0]), float(p[1])) for p in value]
        pairs = [part.split() for part in text.split(";") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("each point needs two numbers 'y z'")
        return [(float(y), float(z)) for y, z in pairs]
    except (ValueError, TypeError, IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"polygon_yz_mm: {exc}") from exc


def import_rows(session: Session, rows: Iterable[RoiIn]) -> list[StoredAnnotation]:
    """Store every row in the caller's transaction (all or nothing).

    A row's identity is its content: importing the same file twice stores nothing new.
    """
    stored = []
    for roi in rows:
        digest = hashlib.sha256(roi.model_dump_json().encode()).hexdigest()[:40]
        stored.append(create_annotation(session, roi, source="csv", source_key=f"csv:{digest}"))
    return stored
