"""The whole automatic path on a labelled cohort (``evaluate --auto``, ``validate --auto``).

The reader-ROI figures measure the classifier on ROIs a person (or the cohort's localiser rows)
placed; a site switching on automatic triage needs the path it will run: localise every
vertebral body of the series, propose an ROI per body, classify them all, flag the study on
its most suspicious body. Here that path runs on each test patient's series with the model of
the fold the patient is tested in:

- :func:`prepare_automatic` localises each patient's series once, before the folds (the
  localiser has no trained weights, so it does not depend on the fold), and keeps the network
  inputs of every proposed body (a body whose ROI reaches outside the series is left out, as
  the worker leaves it out); a patient nothing can be analysed of keeps the reason;
- :func:`score_fold` classifies every body of the fold's test patients: a body's probability is
  the maximum over its slices, the patient's the maximum over its bodies;
- :func:`summarise_automatic_path` gives per-patient AUROC (bootstrap interval), sensitivity
  and specificity at the threshold, bodies per patient and the patients that could not be
  analysed; those count as not flagged (score 0, below any threshold), as the worker leaves
  such a study unflagged with "could not analyse".

``validate --auto`` (:mod:`model.training.validate`) scores the same bodies with one fixed
checkpoint (:func:`body_inputs`, :func:`automatic_predictions`).

The series of a patient is the one its manifest row names (``series_dir`` and the ROI's
``series_instance_uid``): the fracture row's, the reader's first.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.io.volume import (
    SeriesError,
    read_series_geometry,
)
from model.serving.localiser import localise, propose_rois
from model.serving.overview import load_for_rois, load_overview
from model.serving.preprocess import PreprocessParams, build_inputs
from model.training.cohort import CohortRow, RoiInputs, label_name
from model.training.metrics import (
    ConfidenceInterval,
    ConfusionMatrix,
    OperatingPoint,
    bootstrap_auroc,
    confusion_matrix,
    threshold_for_sensitivity,
)
from model.training.train import predict_rois

logger = logging.getLogger(__name__)

SLICES_PER_BODY = 5  # as the automatic job proposes them
NO_BODY = "no vertebral body found in the field of view"
ALL_CUT = "the field of view cuts every vertebral body found"
AUTOMATIC_COLUMNS = (
    "patient_id",
    "fold",
    "label",
    "bodies_found",
    "patient_probability",
    "top_body_centre_z_mm",
    "top_body_vertebra",
    "unanalysable",
    "top_body_on_fracture",
)
BODY_COLUMNS = (
    "patient_id",
    "fold",
    "label",
    "body",
    "vertebra",
    "centre_z_mm",
    "confidence",
    "body_probability",
    "slice_x_mm",
    "slice_probabilities",
)


@dataclass(frozen=True, eq=False)
class AutoBody:
    """One proposed body of a patient's series: where it is and its network inputs."""

    vertebra: str | None
    centre_z_mm: float
    confidence: float
    x_mm: tuple[float, ...]
    inputs: np.ndarray = field(repr=False)  # (slices, 3, 64, 64) float32


@dataclass(frozen=True)
class AutoPatient:
    """A patient's series after localisation: its bodies, or why none can be analysed."""

    patient_id: str
    label: int  # 1 = malignant
    series_instance_uid: str
    bodies: tuple[AutoBody, ...]
    unanalysable: str | None = None
    proposed: int = 0  # bodies the localiser found (some may be left out)
    fracture_z_mm: tuple[float, float] | None = None  # the fracture ROI's z range


@dataclass(frozen=True)
class BodyScore:
    vertebra: str | None
    centre_z_mm: float
    confidence: float
    x_mm: tuple[float, ...]
    slice_probabilities: tuple[float, ...]

    @property
    def probability(self) -> float:
        return max(self.slice_probabilities)


@dataclass(frozen=True)
class AutomaticPrediction:
    """One test patient on the automatic path; ``probability`` is None when unanalysable."""

    patient_id: str
    fold: int
    label: int
    bodies: tuple[BodyScore, ...]
    unanalysable: str | None = None
    fracture_z_mm: tuple[float, float] | None = None

    @property
    def top_on_fracture(self) -> bool | None:
        """Whether the most suspicious body's centre lies within the fracture ROI's z range
        (None when unanalysable or the fracture's place is not known)."""
        top = self.top_body
        if top is None or self.fracture_z_mm is None:
            return None
        low, high = self.fracture_z_mm
        return low <= top.centre_z_mm <= high

    @property
    def probability(self) -> float | None:
        return max((b.probability for b in self.bodies), default=None)

    @property
    def score(self) -> float:
        """The score the figures use: an unanalysable patient is not flagged (0)."""
        probability = self.probability
        return 0.0 if probability is None else probability

    @property
    def top_body(self) -> BodyScore | None:
        return max(self.bodies, key=lambda b: b.probability, default=None)


def _series_row(rows: Sequence[CohortRow]) -> CohortRow:
    """The row whose series is the patient's: its fracture row (the reader's first)."""
    fracture = [r for r in rows if not r.normal]
    reader = [r for r in fracture if r.source == "reader"]
    return (reader or fracture or list(rows))[0]


def localise_patient(
    patient_id: str,
    label: int,
    files: Sequence[Path],
    series_instance_uid: str,
    params: PreprocessParams,
    *,
    workers: int | None = None,
) -> AutoPatient:
    """Localise one series, propose an ROI per body and build each body's inputs."""

    def unanalysable(reason: str, proposed: int = 0) -> AutoPatient:
        return AutoPatient(patient_id, label, series_instance_uid, (), reason, proposed)

    try:
        geometry = read_series_geometry(files)
        overview = load_overview(geometry, workers=workers)
    except SeriesError as exc:
        return unanalysable(f"the series cannot be read as a volume: {exc}")
    localisation = localise(overview)
    if localisation.unanalysable:
        return unanalysable(localisation.unanalysable)
    if not localisation.bodies:
        return unanalysable(NO_BODY)
    proposals = propose_rois(
        localisation,
        study_instance_uid=overview.study_instance_uid,
        series_instance_uid=overview.series_instance_uid,
        slices=SLICES_PER_BODY,
    )
    try:
        volume = load_for_rois(
            geometry, overview, [p.roi for p in proposals], params, workers=workers
        )
    except SeriesError as exc:
        return unanalysable(f"the series cannot be read as a volume: {exc}", len(proposals))
    bodies: list[AutoBody] = []
    for proposal, body in zip(proposals, localisation.bodies, strict=True):
        try:
            inputs = build_inputs(volume, proposal.roi, params)
        except SeriesError as exc:
            logger.info("%s: body %s left out: %s", patient_id, proposal.roi.vertebra or "?", exc)
            continue
        bodies.append(
            AutoBody(
                vertebra=proposal.roi.vertebra,
                centre_z_mm=float(body.centre_mm[2]),
                confidence=float(proposal.confidence),
                x_mm=tuple(float(x) for x in proposal.roi.slices_x_mm),
                inputs=np.ascontiguousarray(inputs, dtype=np.float32),
            )
        )
    if not bodies:
        return unanalysable(ALL_CUT, len(proposals))
    return AutoPatient(patient_id, label, series_instance_uid, tuple(bodies), None, len(proposals))


def prepare_automatic(
    rows: Sequence[CohortRow],
    params: PreprocessParams | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, AutoPatient]:
    """Every patient of the manifest localised once (patients in first-seen order)."""
    params = params or PreprocessParams()
    grouped: dict[str, list[CohortRow]] = {}
    for row in rows:
        grouped.setdefault(row.patient_id, []).append(row)
    patients: dict[str, AutoPatient] = {}
    for patient_id, patient_rows in tqdm(
        grouped.items(), desc="localising", unit="patient", disable=not progress
    ):
        row = _series_row(patient_rows)
        label = max(r.label for r in patient_rows)
        patient = localise_patient(
            patient_id,
            label,
            row.series_files,
            row.roi.series_instance_uid,
            params,
            workers=workers,
        )
        fracture = None if row.normal else row.roi
        if fracture is not None and fracture.series_instance_uid == patient.series_instance_uid:
            zs = [z for _, z in fracture.polygon_yz_mm]
            patient = replace(patient, fracture_z_mm=(min(zs), max(zs)))
        patients[patient_id] = patient
    found = [len(p.bodies) for p in patients.values() if p.unanalysable is None]
    logger.info(
        "automatic path: %d patients localised, %d unanalysable, %.1f bodies per patient",
        len(patients),
        len(patients) - len(found),
        float(np.mean(found)) if found else 0.0,
    )
    return patients


def score_fold(
    model: nn.Module,
    patients: Iterable[AutoPatient],
    fold: int,
    *,
    device: torch.device | str,
) -> list[AutomaticPrediction]:
    """Every body of ``patients`` classified with the fold's model, in one pass."""
    patients = list(patients)
    rois = body_inputs(patients)
    return automatic_predictions(
        patients, fold, predict_rois(model, rois, device=device) if rois else []
    )


def body_inputs(patients: Iterable[AutoPatient]) -> list[RoiInputs]:
    """Every body of ``patients`` as one ROI's inputs, patients and bodies in order."""
    return [
        RoiInputs(patient_id=p.patient_id, label=p.label, inputs=b.inputs, x_mm=b.x_mm)
        for p in patients
        for b in p.bodies
    ]


def automatic_predictions(
    patients: Sequence[AutoPatient], fold: int, slice_probabilities: Sequence[np.ndarray]
) -> list[AutomaticPrediction]:
    """The patients' answers from their bodies' slice probabilities (in
    :func:`body_inputs` order): a body's is the maximum over its slices, the patient's the
    maximum over its bodies."""
    probabilities = iter(slice_probabilities)
    predictions = []
    for patient in patients:
        scores = tuple(
            BodyScore(
                vertebra=body.vertebra,
                centre_z_mm=body.centre_z_mm,
                confidence=body.confidence,
                x_mm=body.x_mm,
                slice_probabilities=tuple(float(p) for p in next(probabilities)),
            )
            for body in patient.bodies
        )
        predictions.append(
            AutomaticPrediction(
                patient_id=patient.patient_id,
                fold=fold,
                label=patient.label,
                bodies=scores,
                unanalysable=patient.unanalysable,
                fracture_z_mm=patient.fracture_z_mm,
            )
        )
    return predictions


@dataclass(frozen=True)
class AutomaticPathSummary:
    """The automatic path's per-patient figures; unanalysable patients count as not flagged."""

    threshold: float
    patient_count: int
    analysed: int
    unanalysable: int
    unanalysable_reasons: dict[str, int]
    matrix: ConfusionMatrix
    auroc: ConfidenceInterval | None
    target_sensitivity: float
    operating_point: OperatingPoint | None
    bodies_mean: float
    bodies_min: int
    bodies_max: int
    flagged_malignant: int = 0  # malignant patients at or above the threshold
    flagged_on_fracture: int = 0  # of those, the most suspicious body on the fracture


def summarise_automatic_path(
    predictions: Sequence[AutomaticPrediction],
    *,
    threshold: float,
    target_sensitivity: float = 0.95,
    bootstrap_resamples: int = 2000,
    bootstrap_seed: int = 0,
) -> AutomaticPathSummary:
    if not predictions:
        raise ValueError("no automatic-path predictions to summarise")
    labels = [p.label for p in predictions]
    scores = [p.score for p in predictions]
    failed = [p for p in predictions if p.probability is None]
    reasons: dict[str, int] = {}
    for p in failed:
        reason = p.unanalysable or NO_BODY
        reasons[reason] = reasons.get(reason, 0) + 1
    counts = [len(p.bodies) for p in predictions if p.probability is not None]
    flagged = [p for p in predictions if p.label == 1 and p.score >= threshold]
    return AutomaticPathSummary(
        threshold=threshold,
        patient_count=len(predictions),
        analysed=len(counts),
        unanalysable=len(failed),
        unanalysable_reasons=reasons,
        matrix=confusion_matrix(labels, scores, threshold),
        auroc=bootstrap_auroc(labels, scores, resamples=bootstrap_resamples, seed=bootstrap_seed),
        target_sensitivity=target_sensitivity,
        operating_point=threshold_for_sensitivity(labels, scores, target_sensitivity),
        bodies_mean=float(np.mean(counts)) if counts else 0.0,
        bodies_min=min(counts, default=0),
        bodies_max=max(counts, default=0),
        flagged_malignant=len(flagged),
        flagged_on_fracture=sum(p.top_on_fracture is True for p in flagged),
    )


def _label_text(label: int) -> str:
    return label_name(label, False)


def write_automatic_csv(path: Path, predictions: Sequence[AutomaticPrediction]) -> None:
    """One row per test patient: the automatic path's answer (empty probability when
    unanalysable, with the reason)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(AUTOMATIC_COLUMNS)
        for p in predictions:
            top = p.top_body
            probability = p.probability
            writer.writerow(
                [
                    p.patient_id,
                    p.fold,
                    _label_text(p.label),
                    len(p.bodies),
                    "" if probability is None else f"{probability:.6f}",
                    "" if top is None else f"{top.centre_z_mm:.2f}",
                    "" if top is None or top.vertebra is None else top.vertebra,
                    p.unanalysable or "",
                    {True: "yes", False: "no", None: ""}[p.top_on_fracture],
                ]
            )


def write_bodies_csv(path: Path, predictions: Sequence[AutomaticPrediction]) -> None:
    """One row per body found and classified, inferior to superior within a patient."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(BODY_COLUMNS)
        for p in predictions:
            for index, body in enumerate(p.bodies):
                writer.writerow(
                    [
                        p.patient_id,
                        p.fold,
                        _label_text(p.label),
                        index,
                        body.vertebra or "",
                        f"{body.centre_z_mm:.2f}",
                        f"{body.confidence:.3f}",
                        f"{body.probability:.6f}",
                        " ".join(f"{x:.3f}" for x in body.x_mm),
                        " ".join(f"{q:.6f}" for q in body.slice_probabilities),
                    ]
                )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _interval(value: ConfidenceInterval | None) -> str:
    if value is None:
        return "n/a (one class only)"
    return f"{value.estimate:.3f} ({value.lower:.3f}–{value.upper:.3f})"


def render_automatic_path_table(summary: AutomaticPathSummary) -> str:
    m = summary.matrix
    accuracy = "n/a" if m.accuracy is None else f"{100.0 * m.accuracy:.1f} %"
    return "\n".join(
        [
            "| automatic path | n | not analysable | bodies per patient (min–max) | sensitivity "
            "| specificity | accuracy | AUROC (95 % CI) |",
            "|---|---|---|---|---|---|---|---|",
            f"| per patient, max over the bodies found | {summary.patient_count} | "
            f"{summary.unanalysable} | {summary.bodies_mean:.1f} ({summary.bodies_min}–"
            f"{summary.bodies_max}) | {_number(m.sensitivity)} | {_number(m.specificity)} | "
            f"{accuracy} | {_interval(summary.auroc)} |",
        ]
    )


def _on_fracture_text(summary: AutomaticPathSummary) -> str:
    if not summary.flagged_malignant:
        return "No malignant patient was flagged at the threshold."
    return (
        f"Of the {summary.flagged_malignant} malignant patients flagged, "
        f"{summary.flagged_on_fracture} were flagged on the fractured body itself (the most "
        f"suspicious body's centre within the z range of the fracture's ROI); the others on "
        f"another body."
    )


CROSS_VALIDATION_INTRO = (
    "Each fold's model, after fitting, also ran the whole automatic path on each of its test "
    "patients' series: the localiser found every vertebral body (once per patient, before the "
    "folds: it has no trained weights),"
)


def render_automatic_path_section(
    summary: AutomaticPathSummary,
    *,
    csv_name: str,
    bodies_csv_name: str,
    intro: str | None = None,
) -> list[str]:
    """report.md's section on the automatic path (the lines, blank line last); ``intro``
    says which model ran it on which series, up to the localiser (default: the folds')."""
    point = summary.operating_point
    if point is None:
        point_text = "n/a: no malignant patient among the test folds."
    else:
        point_text = (
            f"threshold {point.threshold:.4f} gives sensitivity {point.sensitivity:.3f} and "
            f"specificity {_number(point.specificity)} (chosen on the same predictions it is "
            f"reported on, so it is optimistic)."
        )
    reasons = [f"- {reason}: {count}" for reason, count in summary.unanalysable_reasons.items()]
    return [
        "## The automatic path (`--auto`)",
        "",
        f"{intro or CROSS_VALIDATION_INTRO} an ROI of {SLICES_PER_BODY} slices "
        f"was proposed per body, every body was classified (body probability = maximum over "
        f"its slices) and the patient probability is the maximum over its bodies, as the "
        f"automatic job flags a study. No reader ROI is used. Threshold "
        f"{summary.threshold:g}. {summary.analysed} of {summary.patient_count} patients could "
        f"be analysed; the {summary.unanalysable} that could not **count as not flagged** "
        f'(score 0), as the worker leaves such a study unflagged with "could not analyse". '
        f"Bodies per analysed patient: mean {summary.bodies_mean:.1f}, "
        f"{summary.bodies_min}–{summary.bodies_max}.",
        "",
        render_automatic_path_table(summary),
        "",
        f"For {100 * summary.target_sensitivity:.0f} % per-patient sensitivity: {point_text}",
        "",
        _on_fracture_text(summary),
        "",
        *(["Not analysable, by reason:", "", *reasons, ""] if reasons else []),
        f"Per patient: [{csv_name}]({csv_name}) (bodies found, patient probability, the most "
        f"suspicious body's centre z and vertebra and whether it lies on the fracture, the reason "
        f"when not analysable); per body: "
        f"[{bodies_csv_name}]({bodies_csv_name}).",
        "",
    ]


def automatic_config(patients: Mapping[str, AutoPatient]) -> dict[str, object]:
    """What config.json records of the automatic path."""
    return {
        "slices_per_body": SLICES_PER_BODY,
        "patients": len(patients),
        "unanalysable": sum(p.unanalysable is not None for p in patients.values()),
        "bodies": sum(len(p.bodies) for p in patients.values()),
        "bodies_left_out": sum(p.proposed - len(p.bodies) for p in patients.values()),
    }
