"""The folder an evaluation writes, whatever made its predictions.

``evaluate`` (cross-validation: each fold's model scores its test patients) and ``validate``
(one fixed checkpoint scores a whole cohort) both end here, so a site reads the same files
and the same figures, computed by the same functions:

- ``predictions.csv`` (one row per slice), ``report.md`` (the paper's table, the normal
  vertebrae and automatic-path figures where the cohort has them, AUROC with its bootstrap
  interval, confusion matrices, the threshold for the target sensitivity, calibration),
  ``roc.png``, ``reliability.png`` and ``misclassified/<patient>.png`` (the misclassified
  patients' inputs and slice probabilities, as in the paper's Figure 3);
- with the automatic path, ``automatic_predictions.csv`` (per patient),
  ``automatic_bodies.csv`` (per body) and its report section;
- ``config.json``: what the caller says made the predictions, plus the automatic path's counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.training.automatic import (
    AutomaticPathSummary,
    AutomaticPrediction,
    AutoPatient,
    automatic_config,
    render_automatic_path_section,
    summarise_automatic_path,
    write_automatic_csv,
    write_bodies_csv,
)
from model.training.cohort import RoiInputs
from model.training.plots import plot_patient_slices, plot_reliability, plot_roc, safe_file_stem
from model.training.report import (
    EvaluationSummary,
    FoldSummary,
    SlicePrediction,
    group_all_rois_by_patient,
    group_by_patient,
    paper_slices,
    render_report,
    summarise,
    write_predictions_csv,
)

PREDICTIONS_CSV = "predictions.csv"
REPORT_MD = "report.md"
ROC_PNG = "roc.png"
RELIABILITY_PNG = "reliability.png"
CONFIG_JSON = "config.json"
AUTOMATIC_CSV = "automatic_predictions.csv"
AUTOMATIC_BODIES_CSV = "automatic_bodies.csv"


@dataclass(frozen=True)
class MetricSettings:
    """How the predictions are turned into figures."""

    threshold: float = 0.5
    target_sensitivity: float = 0.95
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0


@dataclass(frozen=True)
class ReportText:
    """What the report says about how its predictions were made."""

    title: str
    initialisation: str
    protocol: str | None = None  # None: the cross-validation's sentence
    predictions_name: str = "pooled out-of-fold predictions"
    heading: str = ""
    automatic_intro: str | None = None  # None: the cross-validation's sentence


@dataclass(frozen=True)
class EvaluationOutputs:
    out_dir: Path
    summary: EvaluationSummary
    report: Path
    predictions_csv: Path
    roc_png: Path
    reliability_png: Path
    misclassified_plots: dict[str, Path]
    config_json: Path
    automatic: AutomaticPathSummary | None = None
    automatic_csv: Path | None = None
    automatic_bodies_csv: Path | None = None


def _patient_images(
    paper: Sequence[SlicePrediction],
    patient_id: str,
    images_of: dict[tuple[str, int], np.ndarray],
) -> np.ndarray | None:
    """The inputs of the patient's ROIs in the table, in the order of its slices there."""
    rows = list(dict.fromkeys(s.row_number for s in paper if s.patient_id == patient_id))
    if not all((patient_id, row) in images_of for row in rows):
        return None
    return np.concatenate([images_of[patient_id, row] for row in rows])


def write_misclassified(
    out_dir: Path,
    paper: Sequence[SlicePrediction],
    misclassified: Sequence[str],
    inputs: Sequence[RoiInputs],
    threshold: float,
) -> dict[str, Path]:
    """``misclassified/<patient>.png`` for each misclassified patient of the table."""
    images_of = {(roi.patient_id, roi.row_number): roi.inputs for roi in inputs}
    wanted = set(misclassified)
    plots: dict[str, Path] = {}
    if wanted:
        (out_dir / "misclassified").mkdir(exist_ok=True)
    used_stems: set[str] = set()
    for patient in group_by_patient(paper):
        if patient.patient_id not in wanted:
            continue
        stem = safe_file_stem(patient.patient_id)
        while stem in used_stems:
            stem += "_"
        used_stems.add(stem)
        path = out_dir / "misclassified" / f"{stem}.png"
        images = _patient_images(paper, patient.patient_id, images_of)
        plot_patient_slices(path, patient, threshold=threshold, images=images)
        plots[patient.patient_id] = path
    return plots


def write_evaluation(
    out_dir: Path,
    predictions: Sequence[SlicePrediction],
    *,
    metrics: MetricSettings,
    text: ReportText,
    settings: Mapping[str, Any],
    config: Mapping[str, Any],
    inputs: Sequence[RoiInputs],
    folds: Sequence[FoldSummary] = (),
    automatic: Sequence[AutomaticPrediction] | None = None,
    automatic_patients: Mapping[str, AutoPatient] | None = None,
) -> EvaluationOutputs:
    """Summarise ``predictions`` and write every file of the folder (see the module)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    automatic_summary: AutomaticPathSummary | None = None
    automatic_csv = automatic_bodies_csv = None
    automatic_lines: list[str] = []
    if automatic is not None:
        automatic_summary = summarise_automatic_path(
            automatic,
            threshold=metrics.threshold,
            target_sensitivity=metrics.target_sensitivity,
            bootstrap_resamples=metrics.bootstrap_resamples,
            bootstrap_seed=metrics.bootstrap_seed,
        )
        automatic_csv = out_dir / AUTOMATIC_CSV
        write_automatic_csv(automatic_csv, automatic)
        automatic_bodies_csv = out_dir / AUTOMATIC_BODIES_CSV
        write_bodies_csv(automatic_bodies_csv, automatic)
        automatic_lines = render_automatic_path_section(
            automatic_summary,
            csv_name=AUTOMATIC_CSV,
            bodies_csv_name=AUTOMATIC_BODIES_CSV,
            intro=text.automatic_intro,
        )
    summary = summarise(
        predictions,
        threshold=metrics.threshold,
        target_sensitivity=metrics.target_sensitivity,
        bootstrap_resamples=metrics.bootstrap_resamples,
        bootstrap_seed=metrics.bootstrap_seed,
    )
    predictions_csv = out_dir / PREDICTIONS_CSV
    write_predictions_csv(predictions_csv, predictions)
    paper = paper_slices(predictions)
    pooled = group_all_rois_by_patient(predictions) if summary.automatic is not None else None
    roc_png = out_dir / ROC_PNG
    plot_roc(roc_png, paper, metrics.threshold, all_rois=pooled)
    reliability_png = out_dir / RELIABILITY_PNG
    plot_reliability(
        reliability_png,
        [("per patient", summary.patient_calibration), ("per slice", summary.slice_calibration)],
    )
    plots = write_misclassified(out_dir, paper, summary.misclassified, inputs, metrics.threshold)
    report = out_dir / REPORT_MD
    report.write_text(
        render_report(
            summary,
            title=text.title,
            initialisation=text.initialisation,
            folds=folds,
            settings=settings,
            misclassified_plots={p: str(path.relative_to(out_dir)) for p, path in plots.items()},
            automatic_path=automatic_lines,
            protocol=text.protocol,
            predictions_name=text.predictions_name,
            heading=text.heading,
        ),
        encoding="utf-8",
    )
    config_json = out_dir / CONFIG_JSON
    payload = dict(config)
    if automatic is not None:
        payload["automatic_path"] = automatic_config(automatic_patients or {})
    config_json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return EvaluationOutputs(
        out_dir=out_dir,
        summary=summary,
        report=report,
        predictions_csv=predictions_csv,
        roc_png=roc_png,
        reliability_png=reliability_png,
        misclassified_plots=plots,
        config_json=config_json,
        automatic=automatic_summary,
        automatic_csv=automatic_csv,
        automatic_bodies_csv=automatic_bodies_csv,
    )
