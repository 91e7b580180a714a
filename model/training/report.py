"""Evaluation results (cross-validation or a fixed checkpoint's validation): predictions.csv,
the summary numbers and report.md.

The report follows the paper's table (per-slice and per-patient sensitivity, specificity and
accuracy at threshold 0.5) and adds what a site needs before it switches triage on: AUROC with
a 95 % bootstrap interval, confusion matrices, the threshold that reaches a target per-patient
sensitivity and the specificity there, and a calibration summary.

The paper's table is computed on the reader's ROIs only (rows with ``roi_source`` reader and
a fracture label), so its figures stay comparable with the paper's protocol. When the cohort
also holds ROIs on normal vertebral bodies, the report adds the automatic path's figures
(:class:`AutomaticSummary`): the share of normal bodies scored below the threshold
(specificity on normal vertebrae; a body's probability is the maximum over its slices), the
localiser's boxes on the fractured bodies, and a per-patient figure with the patient
probability the maximum over all of the patient's ROIs, a proxy for the automatic path, where
the maximum runs over every body the localiser finds.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.training.cohort import RoiInputs
from model.training.metrics import (
    CalibrationSummary,
    ConfidenceInterval,
    ConfusionMatrix,
    OperatingPoint,
    bootstrap_auroc,
    calibration_summary,
    confusion_matrix,
    threshold_for_sensitivity,
)

LABEL_NAMES = {0: "benign", 1: "malignant"}
NORMAL_LABEL = "normal"
PREDICTION_COLUMNS = (
    "patient_id",
    "fold",
    "slice_x_mm",
    "slice_probability",
    "patient_probability",
    "label",
)
# Added when the predictions hold localiser or normal-body ROIs.
ROI_PREDICTION_COLUMNS = ("manifest_row", "roi_source", "all_rois_patient_probability")
PAPER_RESULTS = (
    "Li et al. (Eur Radiol 2021) report, on 433 patients: per slice sensitivity 0.90, "
    "specificity 0.79, accuracy 85 %; per patient sensitivity 0.95, specificity 0.80, "
    "accuracy 88 %."
)


@dataclass(frozen=True)
class SlicePrediction:
    """One slice of one ROI of a test-fold patient; label 1 = malignant (a normal body is 0).

    ``row_number`` (the manifest row) tells a patient's ROIs apart; ``normal`` marks an ROI
    on a body without fracture; ``source`` is ``reader`` or ``localiser``.
    """

    patient_id: str
    fold: int
    x_mm: float
    probability: float
    label: int
    row_number: int = 0
    normal: bool = False
    source: str = "reader"

    @property
    def label_name(self) -> str:
        return NORMAL_LABEL if self.normal else LABEL_NAMES[self.label]

    @property
    def is_reader_fracture(self) -> bool:
        return self.source == "reader" and not self.normal


def slice_predictions(
    rois: Sequence[RoiInputs], probabilities: Sequence[Sequence[float] | np.ndarray], fold: int
) -> list[SlicePrediction]:
    """One row per slice of each ROI, from its slice probabilities (ROIs in order)."""
    return [
        SlicePrediction(
            patient_id=roi.patient_id,
            fold=fold,
            x_mm=float(x),
            probability=float(probability),
            label=roi.label,
            row_number=roi.row_number,
            normal=roi.normal,
            source=roi.source,
        )
        for roi, slice_probabilities in zip(rois, probabilities, strict=True)
        for x, probability in zip(roi.x_mm, slice_probabilities, strict=True)
    ]


@dataclass(frozen=True)
class PatientPrediction:
    """A patient's slices and their maximum, the per-patient probability (METHOD.md)."""

    patient_id: str
    fold: int
    label: int
    slice_x_mm: tuple[float, ...]
    slice_probabilities: tuple[float, ...]

    @property
    def probability(self) -> float:
        return max(self.slice_probabilities)

    def predicted_label(self, threshold: float) -> int:
        return int(self.probability >= threshold)


def paper_slices(slices: Sequence[SlicePrediction]) -> list[SlicePrediction]:
    """The slices the paper's table is computed on: the reader's fracture ROIs, or, for a
    cohort without any, every fracture ROI (never a normal body)."""
    reader = [s for s in slices if s.is_reader_fracture]
    return reader or [s for s in slices if not s.normal]


def group_by_patient(slices: Iterable[SlicePrediction]) -> list[PatientPrediction]:
    """Patients in first-seen order, slices in the order given."""
    grouped: dict[str, list[SlicePrediction]] = {}
    for row in slices:
        grouped.setdefault(row.patient_id, []).append(row)
    patients: list[PatientPrediction] = []
    for patient_id, rows in grouped.items():
        if len({(r.fold, r.label) for r in rows}) != 1:
            raise ValueError("a patient's slices must share one fold and one label")
        patients.append(
            PatientPrediction(
                patient_id=patient_id,
                fold=rows[0].fold,
                label=rows[0].label,
                slice_x_mm=tuple(r.x_mm for r in rows),
                slice_probabilities=tuple(r.probability for r in rows),
            )
        )
    return patients


def group_all_rois_by_patient(slices: Iterable[SlicePrediction]) -> list[PatientPrediction]:
    """Every ROI of each patient pooled (normal bodies included); the patient's label is its
    fracture's, so the maximum plays the automatic path's role."""
    grouped: dict[str, list[SlicePrediction]] = {}
    for row in slices:
        grouped.setdefault(row.patient_id, []).append(row)
    patients = []
    for patient_id, rows in grouped.items():
        if len({r.fold for r in rows}) != 1:
            raise ValueError("a patient's ROIs must share one fold")
        patients.append(
            PatientPrediction(
                patient_id=patient_id,
                fold=rows[0].fold,
                label=max(r.label for r in rows),
                slice_x_mm=tuple(r.x_mm for r in rows),
                slice_probabilities=tuple(r.probability for r in rows),
            )
        )
    return patients


@dataclass(frozen=True)
class RoiPrediction:
    """One ROI: its probability is the maximum over its slices (a body's, on the automatic
    path)."""

    patient_id: str
    row_number: int
    label: int
    normal: bool
    source: str
    probability: float


def group_by_roi(slices: Iterable[SlicePrediction]) -> list[RoiPrediction]:
    grouped: dict[tuple[str, int, bool, str], list[SlicePrediction]] = {}
    for row in slices:
        grouped.setdefault((row.patient_id, row.row_number, row.normal, row.source), []).append(row)
    return [
        RoiPrediction(
            patient_id=key[0],
            row_number=key[1],
            label=rows[0].label,
            normal=key[2],
            source=key[3],
            probability=max(r.probability for r in rows),
        )
        for key, rows in grouped.items()
    ]


@dataclass(frozen=True)
class AutomaticSummary:
    """The automatic path's figures, from the ROIs on normal bodies and all ROIs pooled."""

    normal_rois: int
    normal_patients: int
    normal_specificity: float  # share of normal bodies scored below the threshold
    fractured_body_rois: int  # localiser ROIs on fractured bodies
    fractured_body_matrix: ConfusionMatrix | None
    patient_count: int
    patient_matrix: ConfusionMatrix  # patient probability = max over all its ROIs
    patient_auroc: ConfidenceInterval | None


def summarise_automatic(
    slices: Sequence[SlicePrediction],
    *,
    threshold: float,
    bootstrap_resamples: int,
    bootstrap_seed: int,
) -> AutomaticSummary | None:
    """None when no ROI lies on a normal body."""
    rois = group_by_roi(slices)
    normals = [r for r in rois if r.normal]
    if not normals:
        return None
    bodies = [r for r in rois if not r.normal and r.source == "localiser"]
    patients = group_all_rois_by_patient(slices)
    labels = [p.label for p in patients]
    scores = [p.probability for p in patients]
    return AutomaticSummary(
        normal_rois=len(normals),
        normal_patients=len({r.patient_id for r in normals}),
        normal_specificity=sum(r.probability < threshold for r in normals) / len(normals),
        fractured_body_rois=len(bodies),
        fractured_body_matrix=confusion_matrix(
            [r.label for r in bodies], [r.probability for r in bodies], threshold
        )
        if bodies
        else None,
        patient_count=len(patients),
        patient_matrix=confusion_matrix(labels, scores, threshold),
        patient_auroc=bootstrap_auroc(
            labels, scores, resamples=bootstrap_resamples, seed=bootstrap_seed
        ),
    )


@dataclass(frozen=True)
class EvaluationSummary:
    threshold: float
    slice_count: int
    patient_count: int
    slice_matrix: ConfusionMatrix
    patient_matrix: ConfusionMatrix
    slice_auroc: ConfidenceInterval | None  # patients resampled (slices are clustered)
    patient_auroc: ConfidenceInterval | None
    target_sensitivity: float
    operating_point: OperatingPoint | None  # per patient
    slice_calibration: CalibrationSummary
    patient_calibration: CalibrationSummary
    misclassified: tuple[str, ...]  # patient ids, at ``threshold``
    automatic: AutomaticSummary | None = None  # with ROIs on normal bodies
    roi_count: int = 0  # every ROI of the predictions (the table uses the reader's)


def summarise(
    slices: Sequence[SlicePrediction],
    *,
    threshold: float = 0.5,
    target_sensitivity: float = 0.95,
    bootstrap_resamples: int = 2000,
    bootstrap_seed: int = 0,
) -> EvaluationSummary:
    if not slices:
        raise ValueError("no predictions to summarise")
    every_slice = slices
    slices = paper_slices(every_slice)
    if not slices:
        raise ValueError("no predictions on a fracture to summarise")
    patients = group_by_patient(slices)
    slice_labels = [s.label for s in slices]
    slice_scores = [s.probability for s in slices]
    patient_labels = [p.label for p in patients]
    patient_scores = [p.probability for p in patients]
    return EvaluationSummary(
        threshold=threshold,
        slice_count=len(slices),
        patient_count=len(patients),
        slice_matrix=confusion_matrix(slice_labels, slice_scores, threshold),
        patient_matrix=confusion_matrix(patient_labels, patient_scores, threshold),
        slice_auroc=bootstrap_auroc(
            slice_labels,
            slice_scores,
            groups=[s.patient_id for s in slices],
            resamples=bootstrap_resamples,
            seed=bootstrap_seed,
        ),
        patient_auroc=bootstrap_auroc(
            patient_labels, patient_scores, resamples=bootstrap_resamples, seed=bootstrap_seed
        ),
        target_sensitivity=target_sensitivity,
        operating_point=threshold_for_sensitivity(
            patient_labels, patient_scores, target_sensitivity
        ),
        slice_calibration=calibration_summary(slice_labels, slice_scores),
        patient_calibration=calibration_summary(patient_labels, patient_scores),
        misclassified=tuple(
            p.patient_id for p in patients if p.predicted_label(threshold) != p.label
        ),
        automatic=summarise_automatic(
            every_slice,
            threshold=threshold,
            bootstrap_resamples=bootstrap_resamples,
            bootstrap_seed=bootstrap_seed,
        ),
        roi_count=len(group_by_roi(every_slice)),
    )


def write_predictions_csv(path: Path, slices: Sequence[SlicePrediction]) -> None:
    """One row per slice: patient, fold, slice x, slice and patient probability, label.

    The patient probability is the paper's (maximum over the reader's ROIs); with localiser
    or normal-body ROIs present, three columns follow: the manifest row, the ROI's source and
    the patient probability over all of the patient's ROIs. The label is the ROI's
    (``normal`` on a normal body).
    """
    paper = {p.patient_id: p.probability for p in group_by_patient(paper_slices(slices))}
    pooled = {p.patient_id: p.probability for p in group_all_rois_by_patient(slices)}
    extended = any(s.normal or s.source != "reader" for s in slices)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS + (ROI_PREDICTION_COLUMNS if extended else ()))
        for row in slices:
            patient = paper.get(row.patient_id)
            values = [
                row.patient_id,
                row.fold,
                f"{row.x_mm:.3f}",
                f"{row.probability:.6f}",
                "" if patient is None else f"{patient:.6f}",
                row.label_name,
            ]
            if extended:
                values += [row.row_number, row.source, f"{pooled[row.patient_id]:.6f}"]
            writer.writerow(values)


def read_predictions_csv(path: Path) -> list[SlicePrediction]:
    label_values = {name: value for value, name in LABEL_NAMES.items()} | {NORMAL_LABEL: 0}
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            SlicePrediction(
                patient_id=row["patient_id"],
                fold=int(row["fold"]),
                x_mm=float(row["slice_x_mm"]),
                probability=float(row["slice_probability"]),
                label=label_values[row["label"]],
                row_number=int(row.get("manifest_row") or 0),
                normal=row["label"] == NORMAL_LABEL,
                source=row.get("roi_source") or "reader",
            )
            for row in csv.DictReader(handle)
        ]


@dataclass(frozen=True)
class FoldSummary:
    """What happened in one fold, for the report's per-fold table."""

    fold: int
    train_patients: int
    validation_patients: int
    test_patients: int
    epochs_run: int
    best_epoch: int
    best_validation_loss: float | None
    seconds: float


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def _interval(value: ConfidenceInterval | None) -> str:
    if value is None:
        return "n/a (one class only)"
    return f"{value.estimate:.3f} ({value.lower:.3f}–{value.upper:.3f})"


def render_table(summary: EvaluationSummary) -> str:
    """The paper's table, with AUROC and counts added."""
    lines = [
        "| level | n | sensitivity | specificity | accuracy | AUROC (95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    for name, count, matrix, area in (
        ("per slice", summary.slice_count, summary.slice_matrix, summary.slice_auroc),
        ("per patient", summary.patient_count, summary.patient_matrix, summary.patient_auroc),
    ):
        lines.append(
            f"| {name} | {count} | {_number(matrix.sensitivity)} | "
            f"{_number(matrix.specificity)} | {_percent(matrix.accuracy)} | {_interval(area)} |"
        )
    return "\n".join(lines)


def render_automatic_table(summary: EvaluationSummary) -> str:
    """The normal vertebrae line and the automatic path's proxies; "" without normal bodies."""
    automatic = summary.automatic
    if automatic is None:
        return ""
    lines = [
        "| ROIs | n | sensitivity | specificity | accuracy | AUROC (95 % CI) |",
        "|---|---|---|---|---|---|",
        f"| normal vertebrae (below threshold) | {automatic.normal_rois} | – | "
        f"{_number(automatic.normal_specificity)} | – | – |",
    ]
    body = automatic.fractured_body_matrix
    if body is not None:
        lines.append(
            f"| fractured bodies, localiser ROIs | {automatic.fractured_body_rois} | "
            f"{_number(body.sensitivity)} | {_number(body.specificity)} | "
            f"{_percent(body.accuracy)} | – |"
        )
    matrix = automatic.patient_matrix
    lines.append(
        f"| per patient, max over all ROIs | {automatic.patient_count} | "
        f"{_number(matrix.sensitivity)} | {_number(matrix.specificity)} | "
        f"{_percent(matrix.accuracy)} | {_interval(automatic.patient_auroc)} |"
    )
    return "\n".join(lines)


def _automatic_section(summary: EvaluationSummary) -> list[str]:
    automatic = summary.automatic
    if automatic is None:
        return []
    return [
        "## Normal vertebrae and the automatic path",
        "",
        f"The cohort also holds {automatic.normal_rois} ROIs on normal vertebral bodies "
        f"({automatic.normal_patients} patients). A body's probability is the maximum over its "
        f"slices; *normal vertebrae* is the share of normal bodies scored below the threshold "
        f"{summary.threshold:g} (specificity on normal vertebrae). *Per patient, max over all "
        f"ROIs* takes the maximum over every ROI of the patient (reader's and localiser's, "
        f"normal bodies included): a proxy for the automatic path, which flags a study on its "
        f"most suspicious body. The paper's table above uses the reader's ROIs only.",
        "",
        render_automatic_table(summary),
        "",
    ]


def render_confusion_matrix(title: str, matrix: ConfusionMatrix) -> str:
    tp, fn = matrix.true_positive, matrix.false_negative
    fp, tn = matrix.false_positive, matrix.true_negative
    return "\n".join(
        [
            f"**{title}**",
            "",
            "| actual \\ predicted | malignant | benign | total |",
            "|---|---|---|---|",
            f"| malignant | {tp} | {fn} | {matrix.positives} |",
            f"| benign | {fp} | {tn} | {matrix.negatives} |",
        ]
    )


def render_calibration(summary: EvaluationSummary) -> str:
    patient = summary.patient_calibration
    lines = [
        f"Brier score: per patient {patient.brier_score:.3f}, "
        f"per slice {summary.slice_calibration.brier_score:.3f}. "
        f"Expected calibration error (10 equal-width bins): per patient "
        f"{patient.expected_calibration_error:.3f}, per slice "
        f"{summary.slice_calibration.expected_calibration_error:.3f}.",
        "",
        "Per-patient reliability (bins holding at least one patient):",
        "",
        "| predicted probability | patients | mean predicted | observed malignant |",
        "|---|---|---|---|",
    ]
    for row in patient.bins:
        if row.count:
            lines.append(
                f"| {row.lower:.1f}–{row.upper:.1f} | {row.count} | "
                f"{_number(row.mean_probability)} | {_number(row.observed_malignant_fraction)} |"
            )
    return "\n".join(lines)


def render_folds(folds: Sequence[FoldSummary]) -> str:
    lines = [
        "| fold | train | validation | test | epochs run | best epoch | best validation loss"
        " | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in folds:
        lines.append(
            f"| {f.fold} | {f.train_patients} | {f.validation_patients} | {f.test_patients} | "
            f"{f.epochs_run} | {f.best_epoch} | {_number(f.best_validation_loss, 4)} | "
            f"{f.seconds:.0f} s |"
        )
    return "\n".join(lines)


def render_report(
    summary: EvaluationSummary,
    *,
    title: str,
    initialisation: str,
    folds: Sequence[FoldSummary],
    settings: Mapping[str, Any],
    misclassified_plots: Mapping[str, str],
    automatic_path: Sequence[str] = (),
    protocol: str | None = None,
    predictions_name: str = "pooled out-of-fold predictions",
    heading: str = "",
) -> str:
    """report.md: the table first, then the details a reviewer asks for; ``automatic_path``
    is the section on the whole automatic path (``--auto``), after the proxies.

    ``protocol`` says how the predictions were made (default: the cross-validation's, from
    ``folds``); ``heading`` lines go right under the initialisation (e.g. the checkpoint
    scored); without ``folds`` the per-fold table is left out."""
    matrix = summary.patient_matrix
    point = summary.operating_point
    if protocol is None:
        protocol = (
            f"Patient-level, label-stratified {len(folds)}-fold cross-validation: every "
            f"patient is in exactly one test fold; validation patients (early stopping) are "
            f"carved from the training folds."
        )
    if point is None:
        threshold_text = "n/a: no malignant patient in the predictions."
    else:
        threshold_text = (
            f"threshold **{point.threshold:.4f}** gives per-patient sensitivity "
            f"{point.sensitivity:.3f} and specificity {_number(point.specificity, 3)} "
            f"({predictions_name}; chosen on the same predictions it is "
            f"reported on, so it is optimistic)."
        )
    misclassified_lines = [
        f"- {patient}: ![{patient}]({misclassified_plots[patient]})"
        if patient in misclassified_plots
        else f"- {patient}"
        for patient in summary.misclassified
    ] or ["none"]
    setting_lines = [f"- {key}: `{value}`" for key, value in settings.items()]
    sections = [
        f"# {title}",
        "",
        f"**Initialisation:** {initialisation}",
        "",
        *([heading, ""] if heading else []),
        f"{protocol} {summary.patient_count} patients "
        f"({matrix.positives} malignant, {matrix.negatives} benign), "
        f"{summary.slice_count} slices. Threshold {summary.threshold:g} "
        f"(probability ≥ threshold is malignant); per-patient probability = maximum over "
        f"the patient's slices."
        + (
            f" The table uses the reader's ROIs only; all {summary.roi_count} ROIs of the "
            f"cohort count in the section on normal vertebrae and the automatic path."
            if summary.automatic is not None
            else ""
        ),
        "",
        "## Results",
        "",
        render_table(summary),
        "",
        f"AUROC intervals: {_resamples_text(summary)}",
        "",
        PAPER_RESULTS,
        "",
        *_automatic_section(summary),
        *automatic_path,
        "## Confusion matrices (threshold " + f"{summary.threshold:g})",
        "",
        render_confusion_matrix("per slice", summary.slice_matrix),
        "",
        render_confusion_matrix("per patient", summary.patient_matrix),
        "",
        f"## Threshold for {100 * summary.target_sensitivity:.0f} % per-patient sensitivity",
        "",
        threshold_text,
        "",
        "## Calibration",
        "",
        render_calibration(summary),
        "",
        "![Reliability diagram](reliability.png)",
        "",
        "## ROC",
        "",
        "![ROC curves](roc.png)",
        "",
        "## Misclassified patients (slice probabilities, as in the paper's Figure 3)",
        "",
        *misclassified_lines,
        "",
        *(["## Folds", "", render_folds(folds), ""] if folds else []),
        "## Settings",
        "",
        *setting_lines,
        "",
    ]
    return "\n".join(sections)


def _resamples_text(summary: EvaluationSummary) -> str:
    interval = summary.patient_auroc or summary.slice_auroc
    if interval is None:
        return "not computed (the predictions hold one class only)."
    return (
        f"{100 * interval.level:.0f} % percentile bootstrap, {interval.resamples} resamples "
        f"(seed {interval.seed}); per-slice intervals resample whole patients."
    )
