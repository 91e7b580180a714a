"""A labelled cohort: the manifest, its validation, and each ROI's network inputs.

The manifest is a CSV with one row per ROI and the columns

- ``patient_id``: the patient; a patient may have several rows (several ROIs, usually on one
  series); cross-validation keeps all of a patient's rows in one fold;
- ``label``: ``benign`` or ``malignant`` (the ROI is on the patient's fracture) or ``normal``
  (the ROI is on a vertebral body without fracture). Every patient has exactly one fracture
  label: at least one ``benign`` or ``malignant`` row, and never both;
- ``series_dir``: a folder holding the patient's CT series (other series in the folder are
  ignored, the ROI names the one to use);
- ``roi``: the ROI JSON of METHOD.md;
- ``roi_source`` (optional column; empty means ``reader``): ``reader``, a radiologist's ROI on
  the most abnormal vertebra (the paper's protocol), or ``localiser``, an ROI as an automatic
  localiser proposes it on a vertebral body (the body's outline box, slices over its inner
  lateral extent).

Relative paths are relative to the manifest's folder. A paper-protocol cohort is one
``reader`` row per patient; a cohort for the automatic task adds ``localiser`` rows on normal
bodies (label ``normal``) and, ideally, one on the fractured body (the patient's label).

Every row is checked (files present, ROI valid, series readable with sound geometry, ROI
inside the volume, labels of a patient consistent) and every problem found is reported
together, each with its row number (the header is row 1, as a spreadsheet shows it), before
any training starts. The inputs of each ROI are built once here, with the same preprocessing
as inference.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from model.io.volume import SeriesError
from model.serving.preprocess import PreprocessParams, build_inputs, load_roi_volume
from model.serving.roi import Roi, RoiError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("patient_id", "label", "series_dir", "roi")  # required
OPTIONAL_COLUMNS = ("roi_source",)
FRACTURE_LABELS = {"benign": 0, "malignant": 1}
NORMAL_LABEL = "normal"
LABEL_VALUES = {**FRACTURE_LABELS, NORMAL_LABEL: 0}  # the training target: 1 = malignant
RoiSource = Literal["reader", "localiser"]
ROI_SOURCES: tuple[RoiSource, ...] = ("reader", "localiser")


@dataclass(frozen=True)
class RowProblem:
    row_number: int
    patient_id: str | None
    message: str

    def __str__(self) -> str:
        who = f" (patient {self.patient_id})" if self.patient_id else ""
        return f"row {self.row_number}{who}: {self.message}"


class CohortError(ValueError):
    """The manifest has problems; ``problems`` lists all of them, by row."""

    def __init__(self, manifest: Path, problems: Sequence[RowProblem]) -> None:
        self.manifest = manifest
        self.problems = tuple(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{manifest}: {len(self.problems)} problem(s), nothing trained:\n{lines}")


def label_name(label: int, normal: bool) -> str:
    """``benign``, ``malignant`` or ``normal``, as the manifest writes it."""
    return NORMAL_LABEL if normal else ("malignant" if label else "benign")


@dataclass(frozen=True)
class CohortRow:
    """A manifest row that passed the file-level checks."""

    row_number: int
    patient_id: str
    label: int  # the training target: 1 = malignant (a normal body is 0)
    series_dir: Path
    roi_path: Path
    roi: Roi
    series_files: tuple[Path, ...]
    normal: bool = False  # the ROI is on a vertebral body without fracture
    source: RoiSource = "reader"

    @property
    def label_name(self) -> str:
        return label_name(self.label, self.normal)


@dataclass(frozen=True, eq=False)
class RoiInputs:
    """One ROI's network inputs (n, 3, 64, 64) float32, the slices' positions x, its patient.

    ``label`` is the training target (1 = malignant; benign fractures and normal bodies are
    0); ``normal`` says the ROI is on a body without fracture; ``source`` who placed it.
    """

    patient_id: str
    label: int  # 1 = malignant
    inputs: np.ndarray = field(repr=False)
    x_mm: tuple[float, ...]
    row_number: int = 0
    normal: bool = False
    source: RoiSource = "reader"

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4 or self.inputs.shape[0] != len(self.x_mm):
            raise ValueError(
                f"inputs of shape {self.inputs.shape} do not match {len(self.x_mm)} slice(s)"
            )
        if self.label not in (0, 1):
            raise ValueError("label must be 0 (benign or normal) or 1 (malignant)")
        if self.normal and self.label:
            raise ValueError("a normal body's label is 0")
        if self.source not in ROI_SOURCES:
            raise ValueError(f"source must be one of {', '.join(ROI_SOURCES)}")

    @property
    def label_name(self) -> str:
        return label_name(self.label, self.normal)


def rois_by_patient(rows: Sequence[RoiInputs]) -> dict[str, list[RoiInputs]]:
    """Each patient's ROIs, patients and ROIs in the order given."""
    grouped: dict[str, list[RoiInputs]] = {}
    for row in rows:
        grouped.setdefault(row.patient_id, []).append(row)
    return grouped


def patient_labels(rows: Sequence[RoiInputs]) -> dict[str, int]:
    """Each patient's fracture label (1 = malignant), the label folds are stratified by.

    The manifest's checks guarantee one fracture label per patient; for ROIs given in
    memory a patient is malignant when any of its ROIs is.
    """
    return {patient: max(r.label for r in rois) for patient, rois in rois_by_patient(rows).items()}


def has_normals(rows: Sequence[RoiInputs]) -> bool:
    return any(r.normal for r in rows)


def _candidate_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            yield path


def files_of_series(folder: Path, series_instance_uid: str) -> tuple[list[Path], set[str]]:
    """The DICOM files of one series under ``folder``, and the other series UIDs seen there."""
    chosen: list[Path] = []
    others: set[str] = set()
    for path in _candidate_files(folder):
        try:
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # not DICOM (a README, a thumbnail): not part of any series
        uid = str(header.get("SeriesInstanceUID", ""))
        if uid == series_instance_uid:
            chosen.append(path)
        elif uid:
            others.add(uid)
    return chosen, others


def _read_roi(path: Path) -> Roi:
    with path.open(encoding="utf-8") as handle:
        return Roi.from_json(json.load(handle))


def _check_row(
    row: dict[str, str], row_number: int, base: Path, seen: dict[tuple[str, Path], int]
) -> tuple[CohortRow | None, list[RowProblem]]:
    patient_id = (row.get("patient_id") or "").strip()
    problems: list[RowProblem] = []

    def problem(message: str) -> None:
        problems.append(RowProblem(row_number, patient_id or None, message))

    roi_text = (row.get("roi") or "").strip()
    roi_path = base / roi_text
    if not patient_id:
        problem("patient_id is empty")
    elif (patient_id, roi_path) in seen:
        problem(f"patient_id repeats row {seen[patient_id, roi_path]} with the same ROI file")
    else:
        seen[patient_id, roi_path] = row_number
    label_text = (row.get("label") or "").strip().lower()
    if label_text not in LABEL_VALUES:
        problem(f"unknown label {row.get('label')!r} (expected 'benign', 'malignant' or 'normal')")
    source_text = (row.get("roi_source") or "").strip().lower() or "reader"
    source: RoiSource = "localiser" if source_text == "localiser" else "reader"
    if source_text not in ROI_SOURCES:
        problem(f"unknown roi_source {row.get('roi_source')!r} (expected 'reader' or 'localiser')")
    roi: Roi | None = None
    if not roi_text:
        problem("roi is empty")
    elif not roi_path.is_file():
        problem(f"ROI file {roi_path} does not exist")
    else:
        try:
            roi = _read_roi(roi_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem(f"ROI file {roi_path} is not readable JSON: {exc}")
        except RoiError as exc:
            problem(f"ROI file {roi_path} is invalid: {exc}")
    series_text = (row.get("series_dir") or "").strip()
    series_dir = base / series_text
    files: list[Path] = []
    if not series_text:
        problem("series_dir is empty")
    elif not series_dir.is_dir():
        problem(f"series folder {series_dir} does not exist")
    elif roi is not None:
        files, others = files_of_series(series_dir, roi.series_instance_uid)
        if not files:
            found = f" (it holds series {', '.join(sorted(others))})" if others else ""
            problem(
                f"series folder {series_dir} holds no DICOM file of the ROI's series "
                f"{roi.series_instance_uid}{found}"
            )
    if problems or roi is None:
        return None, problems
    return (
        CohortRow(
            row_number=row_number,
            patient_id=patient_id,
            label=LABEL_VALUES[label_text],
            series_dir=series_dir,
            roi_path=roi_path,
            roi=roi,
            series_files=tuple(files),
            normal=label_text == NORMAL_LABEL,
            source=source,
        ),
        problems,
    )


def _check_patients(labelled: list[tuple[int, str, str]]) -> list[RowProblem]:
    """Each patient has one fracture label: ``labelled`` is (row number, patient, label)."""
    problems: list[RowProblem] = []
    fracture: dict[str, tuple[int, str]] = {}
    first_row: dict[str, int] = {}
    for row_number, patient, label in labelled:
        first_row.setdefault(patient, row_number)
        if label == NORMAL_LABEL:
            continue
        if patient not in fracture:
            fracture[patient] = (row_number, label)
        elif fracture[patient][1] != label:
            where, earlier = fracture[patient]
            problems.append(
                RowProblem(
                    row_number,
                    patient,
                    f"label {label!r} contradicts row {where} ({earlier!r}): a patient has "
                    "one fracture label, its other rows are that label or 'normal'",
                )
            )
    for patient, row_number in first_row.items():
        if patient not in fracture:
            problems.append(
                RowProblem(
                    row_number,
                    patient,
                    "only 'normal' rows: every patient needs a row on its fracture, labelled "
                    "'benign' or 'malignant'",
                )
            )
    return problems


def check_manifest(manifest: Path) -> tuple[list[CohortRow], list[RowProblem]]:
    """Parse every row and check its files; returns the sound rows and all problems."""
    base = manifest.parent
    rows: list[CohortRow] = []
    problems: list[RowProblem] = []
    try:
        handle = manifest.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        return [], [RowProblem(0, None, f"cannot open manifest: {exc}")]
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            return [], [RowProblem(1, None, f"header lacks column(s) {', '.join(missing)}")]
        seen: dict[tuple[str, Path], int] = {}
        labelled: list[tuple[int, str, str]] = []
        for row in reader:
            checked, row_problems = _check_row(row, reader.line_num, base, seen)
            problems.extend(row_problems)
            if checked is not None:
                rows.append(checked)
            patient = (row.get("patient_id") or "").strip()
            label = (row.get("label") or "").strip().lower()
            if patient and label in LABEL_VALUES:
                labelled.append((reader.line_num, patient, label))
        problems.extend(_check_patients(labelled))
        problems.sort(key=lambda p: p.row_number)
    if not rows and not problems:
        problems.append(RowProblem(2, None, "the manifest lists no patient"))
    return rows, problems


def read_manifest(manifest: Path) -> list[CohortRow]:
    """The manifest's rows after the file-level checks; :class:`CohortError` lists all."""
    rows, problems = check_manifest(manifest)
    if problems:
        raise CohortError(manifest, problems)
    return rows


def load_roi_inputs(
    row: CohortRow, params: PreprocessParams, *, workers: int | None = None
) -> RoiInputs:
    """Load the series (only the slices the ROI needs) and build the network inputs."""
    volume = load_roi_volume(row.series_files, row.roi, workers=workers)
    inputs = build_inputs(volume, row.roi, params)
    return RoiInputs(
        patient_id=row.patient_id,
        label=row.label,
        inputs=np.ascontiguousarray(inputs, dtype=np.float32),
        x_mm=tuple(float(x) for x in row.roi.slices_x_mm),
        row_number=row.row_number,
        normal=row.normal,
        source=row.source,
    )


def load_cohort(
    manifest: Path,
    params: PreprocessParams | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> list[RoiInputs]:
    """Every row's inputs, or :class:`CohortError` with every problem of every row."""
    params = params or PreprocessParams()
    rows, problems = check_manifest(manifest)
    rois: list[RoiInputs] = []
    for row in tqdm(rows, desc="loading cohort", unit="ROI", disable=not progress):
        try:
            rois.append(load_roi_inputs(row, params, workers=workers))
        except SeriesError as exc:  # includes an ROI outside the volume
            problems.append(RowProblem(row.row_number, row.patient_id, f"{exc}"))
        except (RoiError, ValueError) as exc:
            problems.append(
                RowProblem(row.row_number, row.patient_id, f"cannot build inputs: {exc}")
            )
    if problems:
        raise CohortError(manifest, sorted(problems, key=lambda p: p.row_number))
    labels = patient_labels(rois)
    logger.info(
        "cohort %s: %d patients (%d malignant, %d benign), %d ROIs (%d on normal bodies), "
        "%d slices",
        manifest.name,
        len(labels),
        sum(labels.values()),
        len(labels) - sum(labels.values()),
        len(rois),
        sum(p.normal for p in rois),
        sum(len(p.x_mm) for p in rois),
    )
    return rois
