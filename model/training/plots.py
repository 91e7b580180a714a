"""Figures of an evaluation: ROC curves, reliability diagrams and per-patient slice
probabilities.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state),
so it is safe in workers and tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model.training.metrics import CalibrationSummary, auroc, confusion_matrix, roc_curve
from model.training.report import LABEL_NAMES, PatientPrediction, SlicePrediction, group_by_patient


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)


def plot_roc(
    path: Path,
    slices: Sequence[SlicePrediction],
    threshold: float = 0.5,
    *,
    all_rois: Sequence[PatientPrediction] | None = None,
) -> None:
    """Per-slice and per-patient ROC curves, with the operating point at ``threshold``;
    ``all_rois`` adds the per-patient curve over all of each patient's ROIs."""
    patients = group_by_patient(slices)
    figure = Figure(figsize=(5.5, 5.0))
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    curves = [
        ("per slice", [s.label for s in slices], [s.probability for s in slices], "tab:blue"),
        ("per patient", [p.label for p in patients], [p.probability for p in patients], "tab:red"),
    ]
    if all_rois:
        curves.append(
            (
                "per patient, all ROIs",
                [p.label for p in all_rois],
                [p.probability for p in all_rois],
                "tab:green",
            )
        )
    for name, labels, scores, colour in curves:
        curve = roc_curve(labels, scores)
        if curve is None:
            continue
        area = auroc(labels, scores)
        axes.step(
            curve.false_positive_rate,
            curve.true_positive_rate,
            where="post",
            color=colour,
            label=f"{name} (AUROC {area:.3f})",
        )
        matrix = confusion_matrix(labels, scores, threshold)
        if matrix.sensitivity is not None and matrix.specificity is not None:
            axes.plot(
                1.0 - matrix.specificity,
                matrix.sensitivity,
                marker="o",
                color=colour,
                linestyle="none",
            )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("1 − specificity")
    axes.set_ylabel("sensitivity")
    axes.set_title(f"ROC, pooled test folds (dots: threshold {threshold:g})")
    axes.legend(loc="lower right")
    figure.tight_layout()
    _save(figure, path)


def plot_reliability(
    path: Path,
    curves: Sequence[tuple[str, CalibrationSummary]],
) -> None:
    """Reliability diagram: per bin of predicted probability, the share observed malignant
    against the bin's mean prediction (marker area ~ count), with each curve's expected
    calibration error in its legend; the diagonal is perfect calibration."""
    figure = Figure(figsize=(5.5, 5.0))
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfect")
    for (name, summary), colour in zip(curves, ("tab:red", "tab:blue", "tab:green"), strict=False):
        filled = [b for b in summary.bins if b.count]
        predicted = [float(b.mean_probability or 0.0) for b in filled]
        observed = [float(b.observed_malignant_fraction or 0.0) for b in filled]
        total = max(sum(b.count for b in filled), 1)
        axes.plot(
            predicted,
            observed,
            color=colour,
            marker="none",
            label=f"{name} (ECE {summary.expected_calibration_error:.3f})",
        )
        axes.scatter(
            predicted, observed, s=[20 + 300 * b.count / total for b in filled], color=colour
        )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("mean predicted probability (10 equal-width bins)")
    axes.set_ylabel("observed malignant fraction")
    axes.set_title("Reliability")
    axes.legend(loc="upper left")
    figure.tight_layout()
    _save(figure, path)


def safe_file_stem(patient_id: str) -> str:
    """A file name made from a patient id: letters, digits, '-', '_' and '.' only."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", patient_id).strip("._") or "patient"
    return stem[:80]


def plot_patient_slices(
    path: Path,
    patient: PatientPrediction,
    *,
    threshold: float = 0.5,
    images: np.ndarray | None = None,
) -> None:
    """One patient like the paper's Figure 3: each slice's input and its probability.

    ``images`` are the patient's network inputs (n, 3, H, W) in slice order; the middle
    channel (the slice itself) is shown above a bar chart of the slice probabilities.
    """
    count = len(patient.slice_probabilities)
    show_images = images is not None and len(images) == count
    figure = Figure(figsize=(max(4.0, 2.0 * count), 4.8 if show_images else 3.0))
    grid = figure.add_gridspec(2 if show_images else 1, count, height_ratios=None)
    if show_images:
        assert images is not None
        for index in range(count):
            axes = figure.add_subplot(grid[0, index])
            axes.imshow(images[index, images.shape[1] // 2], cmap="gray")
            axes.set_title(
                f"x {patient.slice_x_mm[index]:.1f} mm\np {patient.slice_probabilities[index]:.2f}",
                fontsize=9,
            )
            axes.set_xticks([])
            axes.set_yticks([])
    bars = figure.add_subplot(grid[1 if show_images else 0, :])
    positions = np.arange(count)
    colours = ["tab:red" if p >= threshold else "tab:blue" for p in patient.slice_probabilities]
    bars.bar(positions, patient.slice_probabilities, color=colours)
    bars.axhline(threshold, color="black", linestyle="--", linewidth=1)
    bars.set_xticks(positions, [f"{x:.1f}" for x in patient.slice_x_mm])
    bars.set_xlabel("slice position x (mm, LPS)")
    bars.set_ylabel("malignancy probability")
    bars.set_ylim(0.0, 1.0)
    predicted = LABEL_NAMES[patient.predicted_label(threshold)]
    figure.suptitle(
        f"{patient.patient_id} (fold {patient.fold}): {LABEL_NAMES[patient.label]}, "
        f"predicted {predicted}, patient probability {patient.probability:.2f} (max)",
        fontsize=10,
    )
    figure.tight_layout()
    _save(figure, path)
