"""``spine-triage validate``: score a fixed checkpoint on a labelled cohort, without training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from model.serving.checkpoint import CheckpointError
from model.serving.inference import Classifier
from model.training.automatic import prepare_automatic
from model.training.cohort import CohortError, load_cohort, read_manifest
from model.training.validate import ValidationConfig, validate
from worker.commands import COMMANDS
from worker.commands.training import COHORT_HELP, print_results

DESCRIPTION = (
    """\
Score a fixed checkpoint on a labelled cohort, without training: what a site runs on its own
cases before it switches triage on. The inputs are built with the checkpoint's preprocessing
and scored as the worker scores them (same device choice, batching, threshold). Writes to OUT
what 'evaluate' writes, computed by the same code: predictions.csv (one row per slice; fold is
0), report.md (the paper's table per slice and per patient at the threshold, AUROC with 95 %
bootstrap interval, confusion matrices, the threshold reaching the target per-patient
sensitivity, calibration: Brier score, expected calibration error and a reliability table),
roc.png, reliability.png, misclassified/<patient>.png (the inputs and slice probabilities of
each misclassified patient) and config.json (the checkpoint's name, version and sha256, every
setting).

With --auto the whole automatic path runs as well, as the node's automatic job runs it: every
patient's series localised, an ROI proposed on each vertebral body, every body classified,
patient probability = maximum over the bodies (automatic_predictions.csv,
automatic_bodies.csv and a report section).

Exit codes: 0 done; 2 a bad checkpoint, manifest or setting (every manifest problem listed
with its row number before anything is scored).

"""
    + COHORT_HELP
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help=COMMANDS["validate"].help,
        description=DESCRIPTION,
        epilog="examples:\n"
        "  spine-triage validate runs/site-2025/model.pt cohort.csv --out runs/validation\n"
        "  spine-triage validate model.pt cohort.csv --auto --out runs/validation-auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="model.pt to score")
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="cohort manifest (CSV)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="also run the whole automatic path on each patient's series (localise every "
        "body, classify each, patient = max over bodies)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="decision threshold (default: the checkpoint's, as the worker uses it)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="per-patient sensitivity the suggested threshold must reach (default 0.95)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)"
    )
    parser.add_argument("--device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    parser.add_argument(
        "--decode-workers", type=int, metavar="N", help="threads decoding compressed slices"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_validate)


def _fail(message: str) -> int:
    print(f"validate: {message}", file=sys.stderr)
    return 2


def run_validate(args: argparse.Namespace) -> int:
    import torch

    if not 0.0 < args.target_sensitivity <= 1.0:
        return _fail("--target-sensitivity must lie in (0, 1]")
    if args.bootstrap < 0:
        return _fail("--bootstrap must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = None if args.device in (None, "auto") else args.device
    try:
        classifier = Classifier.load(args.checkpoint, device=device, threshold=args.threshold)
    except FileNotFoundError:
        return _fail(f"{args.checkpoint}: no such checkpoint")
    except (OSError, CheckpointError, ValueError, KeyError) as exc:
        return _fail(f"{args.checkpoint}: {exc}")
    progress = not args.no_progress
    try:
        rois = load_cohort(
            args.manifest, classifier.preprocess, workers=args.decode_workers, progress=progress
        )
        automatic = (
            prepare_automatic(
                read_manifest(args.manifest),
                classifier.preprocess,
                workers=args.decode_workers,
                progress=progress,
            )
            if args.auto
            else None
        )
    except CohortError as exc:
        print(exc, file=sys.stderr)
        return 2
    result = validate(
        classifier,
        rois,
        args.out,
        ValidationConfig(
            target_sensitivity=args.target_sensitivity, bootstrap_resamples=args.bootstrap
        ),
        checkpoint=args.checkpoint,
        source=str(args.manifest),
        automatic=automatic,
        progress=progress,
    )
    outputs = result.outputs
    summary = outputs.summary
    print(f"model {classifier.name} {classifier.version} (sha256 {classifier.sha256[:16]}…)")
    for note in result.notes:
        print(f"NOTE  {note}")
    print()
    print_results(summary, outputs.automatic, outputs.automatic_csv)
    print(f"report: {outputs.report}")
    return 0
