"""Cross-validation results: predictions.csv, the summary numbers and report.md.

The report follows the paper's table (per-slice and per-patient sensitivity, specificity and
accuracy at threshold 0.5) and adds what a site needs before it switches triage on: AUROC with
a 95 % bootstrap interval, confusion matrices, the threshold that reaches a target per-patient
sensitivity and the specificity there, and a calibration summary.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
PREDICTION_COLUMNS = (
    "patient_id",
    "fold",
    "slice_x_mm",
    "slice_probability",
    "patient_probability",
    "label",
)
PAPER_RESULTS = (
    "Li et al. (Eur Radiol 2021) report, on 433 patients: per slice sensitivity 0.90, "
    "specificity 0.79, accuracy 85 %; per patient sensitivity 0.95, specificity 0.80, "
    "accuracy 88 %."
)


@dataclass(frozen=True)
class SlicePrediction:
    """One slice of one test-fold patient; label 1 = malignant."""

    patient_id: str
    fold: int
    x_mm: float
    probability: float
    label: int


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
    )


def write_predictions_csv(path: Path, slices: Sequence[SlicePrediction]) -> None:
    """One row per slice: patient, fold, slice x, slice and patient probability, label."""
    patient_probability = {p.patient_id: p.probability for p in group_by_patient(slices)}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for row in slices:
            writer.writerow(
                [
                    row.patient_id,
                    row.fold,
                    f"{row.x_mm:.3f}",
                    f"{row.probability:.6f}",
                    f"{patient_probability[row.patient_id]:.6f}",
                    LABEL_NAMES[row.label],
                ]
            )


def read_predictions_csv(path: Path) -> list[SlicePrediction]:
    label_values = {name: value for value, name in LABEL_NAMES.items()}
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            SlicePrediction(
                patient_id=row["patient_id"],
                fold=int(row["fold"]),
                x_mm=float(row["slice_x_mm"]),
                probability=float(row["slice_probability"]),
                label=label_values[row["label"]],
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
) -> str:
    """report.md: the table first, then the details a reviewer asks for."""
    matrix = summary.patient_matrix
    point = summary.operating_point
    if point is None:
        threshold_text = "n/a: no malignant patient among the test folds."
    else:
        threshold_text = (
            f"threshold **{point.threshold:.4f}** gives per-patient sensitivity "
            f"{point.sensitivity:.3f} and specificity {_number(point.specificity, 3)} "
            f"(pooled out-of-fold predictions; chosen on the same predictions it is "
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
        f"Patient-level, label-stratified {len(folds)}-fold cross-validation: every patient "
        f"is in exactly one test fold; validation patients (early stopping) are carved from "
        f"the training folds. {summary.patient_count} patients "
        f"({matrix.positives} malignant, {matrix.negatives} benign), "
        f"{summary.slice_count} slices. Threshold {summary.threshold:g} "
        f"(probability ≥ threshold is malignant); per-patient probability = maximum over "
        f"the patient's slices.",
        "",
        "## Results",
        "",
        render_table(summary),
        "",
        f"AUROC intervals: {_resamples_text(summary)}",
        "",
        PAPER_RESULTS,
        "",
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
        "## ROC",
        "",
        "![ROC curves](roc.png)",
        "",
        "## Misclassified patients (slice probabilities, as in the paper's Figure 3)",
        "",
        *misclassified_lines,
        "",
        "## Folds",
        "",
        render_folds(folds),
        "",
        "## Settings",
        "",
        *setting_lines,
        "",
    ]
    return "\n".join(sections)


def _resamples_text(summary: EvaluationSummary) -> str:
    interval = summary.patient_auroc or summary.slice_auroc
    if interval is None:
        return "not computed (the test folds hold one class only)."
    return (
        f"{100 * interval.level:.0f} % percentile bootstrap, {interval.resamples} resamples "
        f"(seed {interval.seed}); per-slice intervals resample whole patients."
    )
