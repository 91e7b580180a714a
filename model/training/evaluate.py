"""Patient-level, label-stratified k-fold cross-validation and its outputs.

Each patient, with all of its ROIs, is in exactly one test fold; each fold's model is trained
from scratch on the other folds, with validation patients (early stopping) carved from those
training folds, never from the test fold. The out-of-fold predictions are pooled into one folder:

- ``predictions.csv``: patient, fold, slice x, slice probability, patient probability, label
  (with body ROIs also the manifest row, the ROI's source, the all-ROIs patient probability);
- ``report.md``: the paper's table (reader's ROIs), with normal bodies the normal vertebrae
  and automatic-path figures, and the details (AUROC with bootstrap interval, confusion
  matrices, threshold for the target sensitivity, calibration, folds, settings);
- ``roc.png``, ``reliability.png`` and ``misclassified/<patient>.png`` (slice probabilities,
  as in the paper's Figure 3);
- ``config.json``: every setting and seed, so the run can be repeated.

The folder is written by :mod:`model.training.outputs`, which ``validate`` (a fixed
checkpoint on a cohort, :mod:`model.training.validate`) shares.

With ``automatic`` (``evaluate --auto``: every patient's series localised beforehand, see
:mod:`model.training.automatic`), each fold's model also runs the whole automatic path on its
test patients, and the folder gains ``automatic_predictions.csv`` (one row per patient),
``automatic_bodies.csv`` (one row per body) and a report section beside the reader-ROI figures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.training.automatic import (
    AutomaticPathSummary,
    AutomaticPrediction,
    AutoPatient,
    score_fold,
)
from model.training.cohort import RoiInputs, patient_labels, rois_by_patient
from model.training.folds import FoldSplit, make_cross_validation_splits
from model.training.outputs import (
    MetricSettings,
    ReportText,
    write_evaluation,
)
from model.training.report import (
    EvaluationSummary,
    FoldSummary,
    SlicePrediction,
    slice_predictions,
)
from model.training.train import (
    TrainConfig,
    cohort_description,
    fit,
    predict_rois,
    resolve_device,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrossValidationConfig:
    folds: int = 10
    fold_seed: int = 0  # seeds the patient → fold assignment and validation carve-outs
    threshold: float = 0.5
    target_sensitivity: float = 0.95
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CrossValidationResult:
    out_dir: Path
    summary: EvaluationSummary
    predictions: tuple[SlicePrediction, ...]
    folds: tuple[FoldSummary, ...]
    initialisation: str
    report: Path
    predictions_csv: Path
    roc_png: Path
    misclassified_plots: dict[str, Path]
    config_json: Path
    automatic: AutomaticPathSummary | None = None  # with ``--auto``
    automatic_predictions: tuple[AutomaticPrediction, ...] = ()
    automatic_csv: Path | None = None
    automatic_bodies_csv: Path | None = None


def fold_training_config(config: TrainConfig, fold: int) -> TrainConfig:
    """Each fold trains with its own recorded seed: the run seed plus the fold number."""
    return replace(config, seed=config.seed + fold)


def run_fold(
    split: FoldSplit,
    patients: dict[str, list[RoiInputs]],
    config: TrainConfig,
    *,
    progress: bool,
    automatic: Mapping[str, AutoPatient] | None = None,
) -> tuple[list[SlicePrediction], FoldSummary, str, list[AutomaticPrediction]]:
    """Train on the fold's training patients' ROIs, predict every ROI of its test patients
    (and, with ``automatic``, run the automatic path on their series)."""
    started = time.perf_counter()
    result = fit(
        [roi for p in split.train for roi in patients[p]],
        [roi for p in split.validation for roi in patients[p]],
        fold_training_config(config, split.fold),
        progress=progress,
        description=f"fold {split.fold}",
        keep_progress_bar=False,
    )
    test = [roi for p in split.test for roi in patients[p]]
    probabilities = predict_rois(result.model, test, device=result.device)
    rows = slice_predictions(test, probabilities, split.fold)
    automatic_rows = (
        score_fold(
            result.model, [automatic[p] for p in split.test], split.fold, device=result.device
        )
        if automatic is not None
        else []
    )
    summary = FoldSummary(
        fold=split.fold,
        train_patients=len(split.train),
        validation_patients=len(split.validation),
        test_patients=len(split.test),
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        best_validation_loss=result.best_validation_loss,
        seconds=time.perf_counter() - started,
    )
    initialisation = result.initialisation
    del result
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, summary, initialisation, automatic_rows


def cross_validate(
    patients: Sequence[RoiInputs],
    out_dir: Path,
    config: TrainConfig,
    cv: CrossValidationConfig,
    *,
    preprocessing: dict[str, Any],
    source: str = "",
    title: str = "Cross-validated evaluation",
    progress: bool = False,
    automatic: Mapping[str, AutoPatient] | None = None,
) -> CrossValidationResult:
    """Run the k folds and write every output into ``out_dir``; ``patients`` are the
    cohort's ROIs (several per patient allowed), folds are made over patients.

    ``automatic`` (every patient's localised series, :func:`prepare_automatic`) adds the
    automatic path: each fold's model scores the bodies of its test patients."""
    started = time.perf_counter()
    by_id = rois_by_patient(patients)
    labels = patient_labels(patients)
    if automatic is not None and (missing := sorted(set(labels) - set(automatic))):
        raise ValueError(f"no localised series for patient(s) {', '.join(missing)}")
    splits = make_cross_validation_splits(
        labels, cv.folds, validation_fraction=config.validation_fraction, seed=cv.fold_seed
    )
    predictions: list[SlicePrediction] = []
    fold_summaries: list[FoldSummary] = []
    automatic_predictions: list[AutomaticPrediction] = []
    initialisations: set[str] = set()
    for split in tqdm(splits, desc="folds", unit="fold", disable=not progress):
        rows, fold_summary, initialisation, automatic_rows = run_fold(
            split, by_id, config, progress=progress, automatic=automatic
        )
        predictions.extend(rows)
        automatic_predictions.extend(automatic_rows)
        fold_summaries.append(fold_summary)
        initialisations.add(initialisation)
        logger.info(
            "fold %d/%d done: %d test patients, best epoch %d",
            split.fold + 1,
            len(splits),
            fold_summary.test_patients,
            fold_summary.best_epoch,
        )
    return write_outputs(
        out_dir,
        predictions,
        fold_summaries,
        config=config,
        cv=cv,
        initialisation=" / ".join(sorted(initialisations)),
        preprocessing=preprocessing,
        source=source,
        title=title,
        cohort=cohort_description(patients),
        inputs=patients,
        seconds=time.perf_counter() - started,
        automatic=automatic_predictions if automatic is not None else None,
        automatic_patients=automatic,
    )


def write_outputs(
    out_dir: Path,
    predictions: Sequence[SlicePrediction],
    folds: Sequence[FoldSummary],
    *,
    config: TrainConfig,
    cv: CrossValidationConfig,
    initialisation: str,
    preprocessing: dict[str, Any],
    source: str,
    title: str,
    cohort: dict[str, int],
    inputs: Sequence[RoiInputs],
    seconds: float,
    automatic: Sequence[AutomaticPrediction] | None = None,
    automatic_patients: Mapping[str, AutoPatient] | None = None,
) -> CrossValidationResult:
    settings = {
        "source": source or "(patients given in memory)",
        "folds": cv.folds,
        "fold seed (assignment, validation carve-out)": cv.fold_seed,
        "training seeds": f"{config.seed} + fold number",
        "epochs (max)": config.epochs,
        "early stopping patience": config.patience or "off (best epoch kept)",
        "batch size": config.batch_size,
        "optimiser": f"Adam lr {config.learning_rate:g}, betas ({config.beta1:g}, "
        f"{config.beta2:g}), L2 weight decay {config.weight_decay:g}",
        "loss": "binary cross-entropy on the logit",
        "augmentation": f"{config.augmentation_factor}x random affine {config.augment.to_json()}",
        "validation fraction": config.validation_fraction,
        "device": str(resolve_device(config.device)),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "bootstrap": f"{cv.bootstrap_resamples} resamples, seed {cv.bootstrap_seed}",
        "run time": f"{seconds:.0f} s",
    }
    written = write_evaluation(
        out_dir,
        predictions,
        metrics=MetricSettings(
            threshold=cv.threshold,
            target_sensitivity=cv.target_sensitivity,
            bootstrap_resamples=cv.bootstrap_resamples,
            bootstrap_seed=cv.bootstrap_seed,
        ),
        text=ReportText(title=title, initialisation=initialisation),
        settings=settings,
        config={
            "training": config.to_json(),
            "cross_validation": cv.to_json(),
            "fold_training_seeds": [config.seed + f.fold for f in folds],
            "preprocessing": preprocessing,
            "initialisation": initialisation,
            "cohort": cohort,
            "source": source,
            "torch": torch.__version__,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "folds": [asdict(f) for f in folds],
        },
        inputs=inputs,
        folds=folds,
        automatic=automatic,
        automatic_patients=automatic_patients,
    )
    return CrossValidationResult(
        out_dir=out_dir,
        summary=written.summary,
        predictions=tuple(predictions),
        folds=tuple(folds),
        initialisation=initialisation,
        report=written.report,
        predictions_csv=written.predictions_csv,
        roc_png=written.roc_png,
        misclassified_plots=written.misclassified_plots,
        config_json=written.config_json,
        automatic=written.automatic,
        automatic_predictions=tuple(automatic or ()),
        automatic_csv=written.automatic_csv,
        automatic_bodies_csv=written.automatic_bodies_csv,
    )
