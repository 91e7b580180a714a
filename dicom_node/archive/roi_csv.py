"""ROI annotations from a CSV for bulk work: every row validated, all stored or none.

Columns: ``study_instance_uid, series_instance_uid, slices_x_mm, polygon_yz_mm`` and the
optional ``vertebra, annotator``. ``slices_x_mm`` is a JSON list or numbers separated by
``;``; ``polygon_yz_mm`` a JSON list of [y, z] pairs or ``y z;y z;...``. Each row becomes the
one ROI type (:class:`model.serving.roi.Roi`), checked by its validators.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from dicom_node.archive import lifecycle
from model.serving.roi import Roi, RoiError

MAX_ANNOTATOR_LENGTH = 128

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


@dataclass(frozen=True)
class CsvRow:
    roi: Roi
    annotator: str | None


def parse_csv(text: str) -> list[CsvRow]:
    """Every row validated; raises :class:`CsvImportError` listing all problems by row."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    required = CSV_COLUMNS[:4]
    absent = [column for column in required if column not in header]
    if absent:
        raise CsvImportError([f"header: missing column(s) {', '.join(absent)}"])
    unknown = [column for column in header if column not in CSV_COLUMNS]
    if unknown:
        raise CsvImportError([f"header: unknown column(s) {', '.join(unknown)}"])
    rows: list[CsvRow] = []
    problems: list[str] = []
    for number, record in enumerate(reader, start=2):  # row 1 is the header
        try:
            roi = Roi(
                study_instance_uid=(record.get("study_instance_uid") or "").strip(),
                series_instance_uid=(record.get("series_instance_uid") or "").strip(),
                slices_x_mm=tuple(_numbers(record.get("slices_x_mm") or "")),
                polygon_yz_mm=tuple(_points(record.get("polygon_yz_mm") or "")),
                vertebra=(record.get("vertebra") or "").strip() or None,
            )
            annotator = (record.get("annotator") or "").strip() or None
            if annotator is not None and len(annotator) > MAX_ANNOTATOR_LENGTH:
                raise RoiError(f"annotator: at most {MAX_ANNOTATOR_LENGTH} characters")
            rows.append(CsvRow(roi, annotator))
        except (RoiError, ValueError) as exc:  # RoiError names the field
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


def import_rows(
    session: Session, rows: Iterable[CsvRow], *, now: datetime
) -> list[lifecycle.StoredAnnotation]:
    """Store every row in the caller's transaction (all or nothing).

    A row's identity is its content: importing the same file twice stores nothing new.
    """
    stored = []
    for row in rows:
        digest = hashlib.sha256(_row_identity(row).encode()).hexdigest()[:40]
        stored.append(
            lifecycle.create_annotation(
                session,
                row.roi,
                source="csv",
                source_key=f"csv:{digest}",
                annotator=row.annotator,
                now=now,
            )
        )
    return stored


def _row_identity(row: CsvRow) -> str:
    """The row's content as compact JSON, in the field order the keys were made with since
    the first release (so a file imported before an upgrade is still recognised)."""
    roi = row.roi
    content = {
        "study_instance_uid": roi.study_instance_uid,
        "series_instance_uid": roi.series_instance_uid,
        "slices_x_mm": list(roi.slices_x_mm),
        "polygon_yz_mm": [list(point) for point in roi.polygon_yz_mm],
        "vertebra": roi.vertebra,
        "annotator": row.annotator,
    }
    return json.dumps(content, separators=(",", ":"))
