"""Patient-level, label-stratified k-fold cross-validation and its outputs.

Each patient is in exactly one test fold; each fold's model is trained from scratch on the
other folds, with validation patients (early stopping) carved from those training folds,
never from the test fold. The out-of-fold predictions are pooled into one folder:

- ``predictions.csv``: patient, fold, slice x, slice probability, patient probability, label;
- ``report.md``: the paper's table and the details (AUROC with bootstrap interval, confusion
  matrices, threshold for the target sensitivity, calibration, folds, settings);
- ``roc.png`` and ``misclassified/<patient>.png`` (slice probabilities, as in the paper's
  Figure 3);
- ``config.json``: every setting and seed, so the run can be repeated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.training.cohort import PatientInputs
from model.training.folds import FoldSplit, make_cross_validation_splits
from model.training.plots import plot_patient_slices, plot_roc, safe_file_stem
from model.training.report import (
    EvaluationSummary,
    FoldSummary,
    SlicePrediction,
    group_by_patient,
    render_report,
    summarise,
    write_predictions_csv,
)
from model.training.train import (
    TrainConfig,
    cohort_description,
    fit,
    predict_patients,
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


def fold_training_config(config: TrainConfig, fold: int) -> TrainConfig:
    """Each fold trains with its own recorded seed: the run seed plus the fold number."""
    return replace(config, seed=config.seed + fold)


def run_fold(
    split: FoldSplit,
    patients: dict[str, PatientInputs],
    config: TrainConfig,
    *,
    progress: bool,
) -> tuple[list[SlicePrediction], FoldSummary, str]:
    """Train on the fold's training patients, predict its test patients."""
    started = time.perf_counter()
    result = fit(
        [patients[p] for p in split.train],
        [patients[p] for p in split.validation],
        fold_training_config(config, split.fold),
        progress=progress,
        description=f"fold {split.fold}",
        keep_progress_bar=False,
    )
    test = [patients[p] for p in split.test]
    probabilities = predict_patients(result.model, test, device=result.device)
    rows = [
        SlicePrediction(
            patient_id=patient.patient_id,
            fold=split.fold,
            x_mm=float(x),
            probability=float(probability),
            label=patient.label,
        )
        for patient, slice_probabilities in zip(test, probabilities, strict=True)
        for x, probability in zip(patient.x_mm, slice_probabilities, strict=True)
    ]
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
    return rows, summary, initialisation


def cross_validate(
    patients: Sequence[PatientInputs],
    out_dir: Path,
    config: TrainConfig,
    cv: CrossValidationConfig,
    *,
    preprocessing: dict[str, Any],
    source: str = "",
    title: str = "Cross-validated evaluation",
    progress: bool = False,
) -> CrossValidationResult:
    """Run the k folds and write every output into ``out_dir``."""
    started = time.perf_counter()
    by_id = {p.patient_id: p for p in patients}
    if len(by_id) != len(patients):
        raise ValueError("patient ids must be unique")
    labels = {p.patient_id: p.label for p in patients}
    splits = make_cross_validation_splits(
        labels, cv.folds, validation_fraction=config.validation_fraction, seed=cv.fold_seed
    )
    predictions: list[SlicePrediction] = []
    fold_summaries: list[FoldSummary] = []
    initialisations: set[str] = set()
    for split in tqdm(splits, desc="folds", unit="fold", disable=not progress):
        rows, fold_summary, initialisation = run_fold(split, by_id, config, progress=progress)
        predictions.extend(rows)
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
        inputs=by_id,
        seconds=time.perf_counter() - started,
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
    inputs: dict[str, PatientInputs],
    seconds: float,
) -> CrossValidationResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(
        predictions,
        threshold=cv.threshold,
        target_sensitivity=cv.target_sensitivity,
        bootstrap_resamples=cv.bootstrap_resamples,
        bootstrap_seed=cv.bootstrap_seed,
    )
    predictions_csv = out_dir / "predictions.csv"
    write_predictions_csv(predictions_csv, predictions)
    roc_png = out_dir / "roc.png"
    plot_roc(roc_png, predictions, cv.threshold)
    plots: dict[str, Path] = {}
    misclassified = set(summary.misclassified)
    if misclassified:
        (out_dir / "misclassified").mkdir(exist_ok=True)
    used_stems: set[str] = set()
    for patient in group_by_patient(predictions):
        if patient.patient_id not in misclassified:
            continue
        stem = safe_file_stem(patient.patient_id)
        while stem in used_stems:
            stem += "_"
        used_stems.add(stem)
        path = out_dir / "misclassified" / f"{stem}.png"
        images = inputs[patient.patient_id].inputs if patient.patient_id in inputs else None
        plot_patient_slices(path, patient, threshold=cv.threshold, images=images)
        plots[patient.patient_id] = path
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
    report = out_dir / "report.md"
    report.write_text(
        render_report(
            summary,
            title=title,
            initialisation=initialisation,
            folds=folds,
            settings=settings,
            misclassified_plots={p: str(path.relative_to(out_dir)) for p, path in plots.items()},
        ),
        encoding="utf-8",
    )
    config_json = out_dir / "config.json"
    config_json.write_text(
        json.dumps(
            {
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
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return CrossValidationResult(
        out_dir=out_dir,
        summary=summary,
        predictions=tuple(predictions),
        folds=tuple(folds),
        initialisation=initialisation,
        report=report,
        predictions_csv=predictions_csv,
        roc_png=roc_png,
        misclassified_plots=plots,
        config_json=config_json,
    )
