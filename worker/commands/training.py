"""``spine-triage train``, ``evaluate`` and ``demo-model``: train and validate the classifier."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dicom_node.settings import load_settings
from model.serving.preprocess import PreprocessParams
from model.synthetic.demo import (
    DEMO_INTENDED_USE,
    DEMO_NAME,
    DEMO_RECIPE,
    ensure_demo_checkpoint,
    make_synthetic_cohort,
)
from model.training.augment import AugmentParams
from model.training.automatic import prepare_automatic, render_automatic_path_table
from model.training.cohort import CohortError, load_cohort, read_manifest
from model.training.evaluate import CrossValidationConfig, cross_validate
from model.training.folds import SplitError
from model.training.report import render_automatic_table, render_table
from model.training.train import INTENDED_USE, TrainConfig, main, with_overrides
from worker.commands import COMMANDS

logger = logging.getLogger(__name__)

COHORT_HELP = """\
The cohort is a CSV manifest, one row per ROI (a patient may have several), with the columns
  patient_id   an identifier (used in predictions.csv and plots; folds keep a patient's
               rows together)
  label        benign | malignant (the ROI is on the patient's fracture) | normal (on a
               vertebral body without fracture); one fracture label per patient
  series_dir   folder holding the patient's CT series (DICOM files; other series ignored)
  roi          the ROI JSON (see METHOD.md), e.g.
               {"study_instance_uid": "...", "series_instance_uid": "...",
                "slices_x_mm": [x1, x2, x3], "polygon_yz_mm": [[y, z], ...]}
  roi_source   optional: reader (default; a radiologist's ROI on the most abnormal
               vertebra, the paper's protocol) | localiser (an ROI as the automatic
               localiser proposes it on a vertebral body)
One reader row per patient is the paper's protocol (task reader-roi). Rows on normal bodies
train the automatic task (malignant vs benign or normal; the checkpoint's meta says which),
and evaluate then also reports the normal vertebrae. Relative paths are relative to the
manifest. Every row is checked first (files, ROI, series geometry, ROI inside the volume,
one fracture label per patient) and all problems are listed with their row numbers before
anything is trained.
"""

PROTOCOL_HELP = """\
Defaults follow Li et al. (Eur Radiol 2021): 20x augmentation by random affine transforms
(translation, scaling, rotation, drawn afresh every epoch), binary cross-entropy with L2
regularisation, Adam (learning rate 1e-4, beta1 0.5), batch 32, up to 100 epochs, early
stopping on the lowest validation loss (validation patients carved out of the training
patients). ImageNet initialisation when the torchvision weights are in the local cache, random
otherwise (the report says which). CUDA with bf16 autocast when present, the CPU otherwise.
"""


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training protocol (defaults: the paper's)")
    group.add_argument(
        "--epochs", type=int, metavar="N", help="maximum number of epochs (default 100)"
    )
    group.add_argument(
        "--batch-size", type=int, metavar="N", help="slices per optimiser step (default 32)"
    )
    group.add_argument(
        "--lr", type=float, metavar="LR", dest="learning_rate", help="Adam learning rate (1e-4)"
    )
    group.add_argument("--beta1", type=float, metavar="B", help="Adam beta1 (default 0.5)")
    group.add_argument("--beta2", type=float, metavar="B", help="Adam beta2 (default 0.999)")
    group.add_argument(
        "--weight-decay",
        type=float,
        metavar="L2",
        help="L2 regularisation coefficient (default 1e-4)",
    )
    group.add_argument(
        "--augmentation-factor",
        type=int,
        metavar="N",
        help="times each training slice is seen per epoch, each with a fresh random affine "
        "(default 20)",
    )
    group.add_argument(
        "--max-translation",
        type=float,
        metavar="F",
        help="largest shift, as a fraction of the ROI box side (default 0.10)",
    )
    group.add_argument(
        "--min-scale", type=float, metavar="S", help="smallest zoom factor (default 0.90)"
    )
    group.add_argument(
        "--max-scale", type=float, metavar="S", help="largest zoom factor (default 1.10)"
    )
    group.add_argument(
        "--max-rotation", type=float, metavar="DEG", help="largest rotation in degrees (default 15)"
    )
    group.add_argument(
        "--no-augment", action="store_true", help="no affine augmentation (factor 1, identity)"
    )
    group.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="stop after this many epochs without a lower validation loss; 0 runs every "
        "epoch (the best epoch is kept either way; default 10)",
    )
    group.add_argument(
        "--average-last",
        type=int,
        metavar="N",
        help="keep the average of the last N epochs' weights instead of the best epoch's "
        "(stochastic weight averaging; needs --patience 0; default 0, the demonstration "
        "recipe 5)",
    )
    group.add_argument(
        "--validation-fraction",
        type=float,
        metavar="F",
        help="share of the training patients held out, per label, for early stopping (default 0.1)",
    )
    group.add_argument(
        "--init",
        choices=["imagenet", "random"],
        help="initial weights (default imagenet; random when they are not cached)",
    )
    group.add_argument(
        "--recalibrate-batchnorm",
        action="store_true",
        default=None,
        help="after each epoch, re-estimate BatchNorm statistics on the training slices "
        "(not in the paper; steadier validation loss in short runs)",
    )
    group.add_argument("--seed", type=int, metavar="N", help="training seed (default 0)")
    group.add_argument("--device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice; on a CPU shared with other "
        "work, 1 is often several times faster than more)",
    )
    runtime.add_argument(
        "--decode-workers",
        type=int,
        metavar="N",
        help="threads decoding compressed slices per patient",
    )
    runtime.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    train = subparsers.add_parser(
        "train",
        help=COMMANDS["train"].help,
        description="Train the classifier on a labelled cohort and write OUT/model.pt and\n"
        "OUT/config.json (every setting; also inside the checkpoint's meta).\n\n"
        + PROTOCOL_HELP
        + "\n"
        + COHORT_HELP,
        epilog="examples:\n"
        "  spine-triage train cohort.csv --out runs/site-2025\n"
        "  spine-triage train --synthetic 40 --out runs/demo   (demonstration recipe)",
        formatter_class=formatter,
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("manifest", nargs="?", type=Path, help="cohort manifest (CSV)")
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="train on N synthetic phantoms instead; the checkpoint is marked as a "
        "demonstration model, not for clinical use, and unset flags take the quick "
        "demonstration recipe's values",
    )
    train.add_argument("--out", type=Path, required=True, help="output folder")
    train.add_argument("--name", default=None, help="model name in the checkpoint and SRs")
    train.add_argument("--version", default=None, help="model version (default: UTC time)")
    _add_training_flags(train)
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help=COMMANDS["evaluate"].help,
        description="Cross-validate the training protocol: patient-level, label-stratified\n"
        "k-fold; each patient is in exactly one test fold and every fold's model is trained\n"
        "from scratch. Writes to OUT: predictions.csv, report.md (per-slice and per-patient\n"
        "sensitivity, specificity and accuracy at 0.5, AUROC with 95 % bootstrap interval,\n"
        "confusion matrices, the threshold reaching the target per-patient sensitivity,\n"
        "calibration), roc.png, misclassified/<patient>.png and config.json.\n\n"
        + PROTOCOL_HELP
        + "\n"
        + COHORT_HELP,
        epilog="examples:\n  spine-triage evaluate cohort.csv --folds 10 --out runs/cv-2025\n"
        "  spine-triage evaluate cohort.csv --auto --out runs/cv-auto   (the automatic path too)",
        formatter_class=formatter,
    )
    evaluate_source = evaluate.add_mutually_exclusive_group(required=True)
    evaluate_source.add_argument("manifest", nargs="?", type=Path, help="cohort manifest (CSV)")
    evaluate_source.add_argument(
        "--synthetic", type=int, metavar="N", help="cross-validate on N synthetic phantoms"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="output folder")
    evaluate.add_argument("--folds", type=int, default=10, help="number of folds (default 10)")
    evaluate.add_argument(
        "--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)"
    )
    evaluate.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="per-patient sensitivity the suggested threshold must reach (default 0.95)",
    )
    evaluate.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)"
    )
    evaluate.add_argument(
        "--auto",
        action="store_true",
        help="also run the whole automatic path on each test patient's series with its "
        "fold's model (localise every body, classify each, patient = max over bodies); "
        "adds automatic_predictions.csv, automatic_bodies.csv and a report section",
    )
    _add_training_flags(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    demo = subparsers.add_parser(
        "demo-model",
        help=COMMANDS["demo-model"].help,
        description="Make sure the demonstration checkpoint exists and print its path. It is\n"
        "trained on synthetic phantoms in a few minutes on a CPU the first time, then cached\n"
        "(a changed recipe trains a new one). Its meta says it is a demonstration model\n"
        "trained on synthetic data, not for clinical use. The node serves it when no\n"
        "checkpoint is configured.",
        formatter_class=formatter,
    )
    demo.add_argument(
        "--cache-dir", type=Path, help="where checkpoints are cached (default VAR_DIR/models)"
    )
    demo.add_argument("--retrain", action="store_true", help="train again even when cached")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo_model)


def _training_config(args: argparse.Namespace, base: Any) -> Any:

    augment = base.augment
    factor = args.augmentation_factor
    if args.no_augment:
        augment = AugmentParams(
            max_translation_fraction=0.0, min_scale=1.0, max_scale=1.0, max_rotation_degrees=0.0
        )
        factor = 1
    else:
        augment = AugmentParams(
            max_translation_fraction=_pick(args.max_translation, augment.max_translation_fraction),
            min_scale=_pick(args.min_scale, augment.min_scale),
            max_scale=_pick(args.max_scale, augment.max_scale),
            max_rotation_degrees=_pick(args.max_rotation, augment.max_rotation_degrees),
        )
    epochs = base.epochs if args.epochs is None else args.epochs
    patience = base.patience if args.patience is None else args.patience
    average_last = args.average_last
    if average_last is None:  # the base's averaging, fitted to the epochs and patience asked for
        average_last = 0 if patience else min(base.average_last, epochs)
    return with_overrides(
        base,
        average_last=average_last,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        beta1=args.beta1,
        beta2=args.beta2,
        weight_decay=args.weight_decay,
        augmentation_factor=factor,
        augment=augment,
        patience=args.patience,
        validation_fraction=args.validation_fraction,
        init=args.init,
        seed=args.seed,
        device=args.device,
        recalibrate_batchnorm=args.recalibrate_batchnorm,
    )


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _patients(args: argparse.Namespace, workdir: Path) -> tuple[list[Any], str]:
    """Load the cohort (or make a synthetic one); CohortError lists every row problem."""
    patients, source, _ = _cohort(args, workdir)
    return patients, source


def _cohort(args: argparse.Namespace, workdir: Path) -> tuple[list[Any], str, Path]:
    """The cohort's ROIs, its description and the manifest it was read from."""
    progress = not args.no_progress
    if args.synthetic is not None:
        manifest = make_synthetic_cohort(workdir, patients=args.synthetic, seed=0)
        source = (
            f"{args.synthetic} synthetic phantoms (seed 0), up to {DEMO_RECIPE.normals} "
            "normal bodies each"
        )
    else:
        manifest = args.manifest
        source = str(manifest)
    return (
        load_cohort(manifest, PreprocessParams(), workers=args.decode_workers, progress=progress),
        source,
        manifest,
    )


def _train(args: argparse.Namespace) -> int:
    import tempfile

    _set_threads(args)
    demonstration = args.synthetic is not None
    if demonstration:
        base, name, intended_use = DEMO_RECIPE.train, DEMO_NAME, DEMO_INTENDED_USE
    else:
        base, name, intended_use = TrainConfig(), "spine-triage", INTENDED_USE
    try:
        config = _training_config(args, base)
    except ValueError as exc:
        print(f"invalid setting: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spine-triage-synth-") as workdir:
        try:
            patients, source = _patients(args, Path(workdir))
        except CohortError as exc:
            print(exc, file=sys.stderr)
            return 2
        run = main(
            patients,
            args.out,
            config,
            preprocessing=PreprocessParams().to_json(),
            name=args.name or name,
            version=args.version,
            demonstration=demonstration,
            intended_use=intended_use,
            source=source,
            progress=not args.no_progress,
        )
    fit = run.fit
    print(f"checkpoint   {run.checkpoint}  (sha256 {run.sha256[:16]}…)")
    print(f"config       {args.out / 'config.json'}")
    print(f"model        {run.meta['name']} {run.meta['version']}")
    print(f"task         {run.meta['task']}")
    print(f"init         {fit.initialisation}")
    print(
        f"epochs       {fit.epochs_run} run, best {fit.best_epoch}"
        + (" (stopped early)" if fit.stopped_early else "")
    )
    if fit.best_validation_loss is not None:
        print(f"val. loss    {fit.best_validation_loss:.4f}")
    print(f"time         {fit.seconds:.0f} s on {fit.device}")
    if demonstration:
        print("NOTE         demonstration model trained on synthetic data; not for clinical use")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import tempfile

    _set_threads(args)
    try:
        config = _training_config(args, TrainConfig())
    except ValueError as exc:
        print(f"invalid setting: {exc}", file=sys.stderr)
        return 2
    cv = CrossValidationConfig(
        folds=args.folds,
        fold_seed=args.fold_seed,
        target_sensitivity=args.target_sensitivity,
        bootstrap_resamples=args.bootstrap,
    )
    with tempfile.TemporaryDirectory(prefix="spine-triage-synth-") as workdir:
        try:
            patients, source, manifest = _cohort(args, Path(workdir))
        except CohortError as exc:
            print(exc, file=sys.stderr)
            return 2
        automatic = None
        if args.auto:
            automatic = prepare_automatic(
                read_manifest(manifest),
                PreprocessParams(),
                workers=args.decode_workers,
                progress=not args.no_progress,
            )
        try:
            result = cross_validate(
                patients,
                args.out,
                config,
                cv,
                preprocessing=PreprocessParams().to_json(),
                source=source,
                progress=not args.no_progress,
                automatic=automatic,
            )
        except SplitError as exc:
            print(f"cannot split the cohort: {exc}", file=sys.stderr)
            return 2
    print_results(result.summary, result.automatic, result.automatic_csv)
    print(f"initialisation: {result.initialisation}")
    print(f"report: {result.report}")
    return 0


def print_results(summary: Any, automatic: Any, automatic_csv: Path | None) -> None:
    """The figures evaluate and validate print: the paper's table (and the automatic path's
    when it ran), calibration, the threshold for the target sensitivity, the misclassified."""
    print(render_table(summary))
    print()
    if summary.automatic is not None:
        print(render_automatic_table(summary))
        print()
    if automatic is not None:
        print(render_automatic_path_table(automatic))
        print(
            f"automatic path: {automatic.unanalysable} of {automatic.patient_count} patients "
            f"could not be analysed (counted as not flagged); per patient: {automatic_csv}"
        )
        print()
    calibration = summary.patient_calibration
    print(
        f"calibration (per patient): expected calibration error "
        f"{calibration.expected_calibration_error:.3f}, Brier score {calibration.brier_score:.3f}"
    )
    point = summary.operating_point
    if point is not None:
        print(
            f"threshold for {100 * summary.target_sensitivity:.0f} % per-patient sensitivity: "
            f"{point.threshold:.4f} (specificity {point.specificity or 0.0:.3f})"
        )
    print(f"misclassified patients: {len(summary.misclassified)} of {summary.patient_count}")


def _demo_model(args: argparse.Namespace) -> int:

    cache_dir = args.cache_dir
    if cache_dir is None:
        cache_dir = load_settings().var_dir / "models"
    path = ensure_demo_checkpoint(cache_dir, retrain=args.retrain, progress=not args.no_progress)
    print(path)
    return 0
