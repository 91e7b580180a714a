"""A fixed checkpoint scored on a labelled cohort, without training (``spine-triage validate``).

A site scores the model it was given on its own labelled cases before it switches triage on
(Li et al.: "when a new dataset is available, the developed model can be readily applied to
test its generalization ability"). The cohort is the manifest ``evaluate`` reads
(:mod:`model.training.cohort`); its inputs are built with the checkpoint's own preprocessing,
and the checkpoint is served as the worker serves it (:class:`Classifier`: the same device
choice, batching and threshold). Every ROI's slices are scored; with ``automatic`` (the
cohort's series localised, :func:`model.training.automatic.prepare_automatic`) the whole
automatic path runs too, as the automatic job does: every body found classified, the patient
flagged on the maximum.

The folder is the one ``evaluate`` writes (:mod:`model.training.outputs`: predictions.csv,
report.md with the paper's table, AUROC with bootstrap interval, confusion matrices, the
threshold for the target sensitivity, calibration with a reliability diagram, the
misclassified patients' inputs), with ``fold`` 0 for every row: one cohort, no folds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.serving.checkpoint import TASK_AUTOMATIC, checkpoint_task
from model.serving.inference import Classifier
from model.training.automatic import (
    AutomaticPrediction,
    AutoPatient,
    automatic_predictions,
    body_inputs,
)
from model.training.cohort import RoiInputs
from model.training.outputs import EvaluationOutputs, MetricSettings, ReportText, write_evaluation
from model.training.report import SlicePrediction, slice_predictions
from model.training.train import cohort_description

logger = logging.getLogger(__name__)

FOLD = 0  # one cohort: every row of predictions.csv is in "fold" 0
SCORING_CHUNK = 256  # slices per progress step


@dataclass(frozen=True)
class ValidationConfig:
    target_sensitivity: float = 0.95
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ValidationResult:
    outputs: EvaluationOutputs
    predictions: tuple[SlicePrediction, ...]
    automatic_predictions: tuple[AutomaticPrediction, ...]
    notes: tuple[str, ...]  # what the reader of the report must know about the checkpoint


def score_rois(
    classifier: Classifier,
    rois: Sequence[RoiInputs],
    *,
    progress: bool = False,
    description: str = "scoring",
) -> list[np.ndarray]:
    """The slice probabilities of each ROI (in order), the inputs run in batches."""
    return score_rois_and_domain(classifier, rois, progress=progress, description=description)[0]


def score_rois_and_domain(
    classifier: Classifier,
    rois: Sequence[RoiInputs],
    *,
    progress: bool = False,
    description: str = "scoring",
) -> tuple[list[np.ndarray], list[float] | None]:
    """Each ROI's slice probabilities and (with an out-of-domain guard) its domain score
    (the maximum over its slices, as the worker takes it), from one pass."""
    if not rois:
        return [], None
    flat = np.concatenate([roi.inputs for roi in rois])
    scored: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    with tqdm(total=len(flat), desc=description, unit="slice", disable=not progress) as bar:
        for start in range(0, len(flat), SCORING_CHUNK):
            chunk = flat[start : start + SCORING_CHUNK]
            scores = classifier.score_inputs(chunk)
            scored.append(scores.probabilities)
            if scores.domain_scores is not None:
                distances.append(scores.domain_scores)
            bar.update(len(chunk))
    probabilities = np.concatenate(scored)
    domain = np.concatenate(distances) if distances else None
    result, roi_domain, start = [], [], 0
    for roi in rois:
        end = start + len(roi.x_mm)
        result.append(probabilities[start:end])
        if domain is not None:
            roi_domain.append(float(domain[start:end].max()))
        start = end
    return result, roi_domain if domain is not None else None


def domain_distribution(classifier: Classifier, roi_scores: Sequence[float] | None) -> list[str]:
    """The report's paragraph on the cohort's domain scores (the out-of-domain guard)."""
    if classifier.domain is None or roi_scores is None:
        return ["The checkpoint has no description of its training domain: no out-of-domain guard."]
    scores = np.asarray(roi_scores, dtype=np.float64)
    threshold = classifier.domain.threshold
    outside = int((scores > threshold).sum())
    quartiles = np.percentile(scores, [25, 50, 75, 95])
    return [
        f"**Out-of-domain guard** (checkpoint threshold {threshold:.3f}, "
        f"{classifier.meta['domain']['method']}): domain scores of the {scores.size} ROIs "
        f"min {scores.min():.3f}, quartiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / "
        f"{quartiles[2]:.3f}, 95th percentile {quartiles[3]:.3f}, max {scores.max():.3f}; "
        f"**{outside} of {scores.size} ROIs outside the model's training domain** (the worker "
        "would report them and flag none of them)."
    ]


def checkpoint_notes(classifier: Classifier, rois: Sequence[RoiInputs], auto: bool) -> list[str]:
    """What the report must say of the checkpoint before its figures are read."""
    notes = []
    task = checkpoint_task(classifier.meta)
    if task != TASK_AUTOMATIC and (auto or any(roi.normal for roi in rois)):
        notes.append(
            f"The checkpoint was trained for the task {task!r}: it has never seen normal "
            f"vertebrae, and the worker refuses it for automatic triage; the figures on "
            f"normal bodies and the automatic path show why."
        )
    if classifier.meta.get("demonstration"):
        notes.append(
            "The checkpoint is a demonstration model trained on synthetic phantoms; not for "
            "clinical use."
        )
    return notes


def validate(
    classifier: Classifier,
    rois: Sequence[RoiInputs],
    out_dir: Path,
    config: ValidationConfig,
    *,
    checkpoint: Path,
    source: str = "",
    automatic: Mapping[str, AutoPatient] | None = None,
    progress: bool = False,
) -> ValidationResult:
    """Score every ROI (and, with ``automatic``, every body of every patient's series) with
    ``classifier`` and write the evaluation folder into ``out_dir``."""
    started = time.perf_counter()
    probabilities, roi_domain = score_rois_and_domain(classifier, rois, progress=progress)
    predictions = slice_predictions(rois, probabilities, FOLD)
    automatic_rows: list[AutomaticPrediction] | None = None
    if automatic is not None:
        patients = list(automatic.values())
        bodies = body_inputs(patients)
        automatic_rows = automatic_predictions(
            patients,
            FOLD,
            score_rois(classifier, bodies, progress=progress, description="automatic path"),
        )
    seconds = time.perf_counter() - started
    notes = checkpoint_notes(classifier, rois, automatic is not None)
    notes.extend(domain_distribution(classifier, roi_domain))
    meta = classifier.meta
    model = {
        "path": str(checkpoint),
        "name": classifier.name,
        "version": classifier.version,
        "sha256": classifier.sha256,
        "task": checkpoint_task(meta),
        "demonstration": bool(meta.get("demonstration", False)),
        "threshold": classifier.threshold,
    }
    settings = {
        "source": source or "(patients given in memory)",
        "checkpoint": str(checkpoint),
        "model": f"{classifier.name} {classifier.version}",
        "sha256": classifier.sha256,
        "task": model["task"],
        "threshold": f"{classifier.threshold:g}",
        "device": str(classifier.device),
        "preprocessing (the checkpoint's)": classifier.preprocess.to_json(),
        "bootstrap": f"{config.bootstrap_resamples} resamples, seed {config.bootstrap_seed}",
        "scoring time": f"{seconds:.0f} s",
    }
    heading = (
        f"**Checkpoint:** {classifier.name} {classifier.version} (sha256 "
        f"`{classifier.sha256[:16]}…`), task {model['task']}, threshold "
        f"{classifier.threshold:g}."
    )
    outputs = write_evaluation(
        out_dir,
        predictions,
        metrics=MetricSettings(
            threshold=classifier.threshold,
            target_sensitivity=config.target_sensitivity,
            bootstrap_resamples=config.bootstrap_resamples,
            bootstrap_seed=config.bootstrap_seed,
        ),
        text=ReportText(
            title="Validation of a fixed checkpoint",
            initialisation="none: a fixed checkpoint, nothing trained",
            protocol=(
                "A fixed checkpoint scored every ROI of the cohort, nothing trained or tuned on "
                "it (an external validation when none of these patients trained the model)."
            ),
            predictions_name="the cohort's predictions",
            heading="\n\n".join([heading, *notes]),
            automatic_intro=(
                "The checkpoint also ran the whole automatic path on each patient's series: "
                "the localiser found every vertebral body (it has no trained weights),"
            ),
        ),
        settings=settings,
        config={
            "checkpoint": model,
            "validation": config.to_json(),
            "preprocessing": classifier.preprocess.to_json(),
            "cohort": cohort_description(rois),
            "domain_scores": roi_domain,
            "source": source,
            "device": str(classifier.device),
            "torch": torch.__version__,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
        },
        inputs=rois,
        automatic=automatic_rows,
        automatic_patients=automatic,
    )
    logger.info(
        "validated %s %s on %d ROIs (%d slices) in %.1f s",
        classifier.name,
        classifier.version,
        len(rois),
        len(predictions),
        seconds,
    )
    return ValidationResult(
        outputs=outputs,
        predictions=tuple(predictions),
        automatic_predictions=tuple(automatic_rows or ()),
        notes=tuple(notes),
    )
