"""``spine-triage classify``: one study from files on disk, as a worker would classify it.

No node, no database, no broker: the series is read from a folder and goes through the
worker's own steps (:func:`worker.series.read_series`; for a reader's ROI the classifier's
``load_volume`` and ``classify``, as :mod:`worker.pipeline` calls them; with ``--auto``
:mod:`worker.automatic`'s ``load_overview``, ``localise_bodies``, ``propose``,
``load_bodies`` and ``classify_bodies``), with the checkpoint, threshold and device the
worker would use, so the probabilities are the worker's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.settings import load_settings
from model.io.volume import SeriesError, group_paths_by_series
from model.serving.checkpoint import TASK_AUTOMATIC, CheckpointError, checkpoint_task
from model.serving.inference import Classifier
from model.serving.localiser import LOCALISER_NAME, LOCALISER_VERSION
from model.serving.prediction import Prediction
from model.serving.roi import Roi, RoiError
from worker.automatic import (
    Body,
    Unanalysable,
    classify_bodies,
    load_bodies,
    load_overview,
    localise_bodies,
    propose,
)
from worker.commands import COMMANDS
from worker.errors import PermanentError, TransientError
from worker.runtime import default_checkpoint
from worker.series import Series, read_series
from worker.sr import AlgorithmInfo, TriageFinding, build_triage_sr, sr_to_bytes
from worker.sr_automatic import LocaliserInfo, build_automatic_sr

DESCRIPTION = """\
Classify one study from DICOM files on disk, as a worker classifies it, with no node and no
database: what a researcher or a site engineer runs first.

SERIES_DIR holds the study's files (searched recursively). With --roi, the series the ROI
names is used and the ROI is classified (ROI JSON as in METHOD.md: study_instance_uid,
series_instance_uid, slices_x_mm, polygon_yz_mm, optional vertebra). With --auto, the CT
series with the most images is used, as the automatic job chooses it: the localiser finds
every vertebral body, an ROI is proposed on each and every body is classified; the study's
probability is the maximum over the bodies.

The checkpoint, threshold, device and series selection rules are the worker's settings
(MODEL_CHECKPOINT, empty: the demonstration model, trained once and cached under
VAR_DIR/models; THRESHOLD; INFERENCE_DEVICE; SERIES_SELECTION); --checkpoint overrides the
checkpoint.

Output: the per-slice probabilities, the per-patient probability (maximum over the slices;
with --auto per body, and the study's maximum over the bodies) and the flag (HIGH when the
probability is at or above the threshold, else ROUTINE). --json prints one JSON object with
at least patient_probability, priority, label, threshold, slice_x_mm and
slice_probabilities (of the ROI, or of the most suspicious body), bodies (--auto), domain
(the out-of-domain guard's verdict: score, threshold, in_domain; null members when the model
has no guard), model and unanalysable (--auto: the reason nothing could be analysed, else
null). --sr OUT.dcm writes the DICOM SR the worker would send (Comprehensive 3D SR, TID 1500).

Exit codes: 0 classified (or, with --auto, a study that cannot be analysed: the reason is
printed and nothing is flagged, as the worker does); 2 a bad folder, series, ROI JSON or
checkpoint.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "classify",
        help=COMMANDS["classify"].help,
        description=DESCRIPTION,
        epilog="examples:\n"
        "  spine-triage classify study/ --roi roi.json\n"
        "  spine-triage classify study/ --auto --json --sr triage-sr.dcm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("series_dir", type=Path, metavar="SERIES_DIR", help="DICOM folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--roi", type=Path, metavar="ROI.json", help="a reader's ROI")
    source.add_argument(
        "--auto", action="store_true", help="localise every vertebral body and classify each"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="MODEL.pt",
        help="checkpoint to use (default: the worker's, MODEL_CHECKPOINT)",
    )
    parser.add_argument("--sr", type=Path, metavar="OUT.dcm", help="write the SR it would send")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_classify)


class ClassifyError(Exception):
    """What is wrong with the command's input (exit code 2)."""


def run_classify(args: argparse.Namespace) -> int:
    try:
        roi = _read_roi(args.roi) if args.roi is not None else None
        if not args.series_dir.is_dir():
            raise ClassifyError(f"{args.series_dir}: not a folder")
        classifier = _classifier(args.checkpoint)
        if roi is not None:
            series = _series_of(args.series_dir, roi.series_instance_uid)
            result = classify_roi(classifier, series, roi)
        else:
            if checkpoint_task(classifier.meta) != TASK_AUTOMATIC:
                raise ClassifyError(
                    f"model {classifier.name} {classifier.version} was trained for the task "
                    f"{checkpoint_task(classifier.meta)!r}, not for automatic triage (it has "
                    "never seen normal vertebrae); use --roi or another checkpoint"
                )
            series = _series_of(args.series_dir, None)
            result = classify_automatic(classifier, series)
    except ClassifyError as exc:
        print(f"classify: {exc}", file=sys.stderr)
        return 2
    if args.sr is not None and result.sr is not None:
        args.sr.parent.mkdir(parents=True, exist_ok=True)
        args.sr.write_bytes(sr_to_bytes(result.sr))
    document = result.to_json(classifier, sr_path=args.sr if result.sr is not None else None)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_text(document)
    if result.unanalysable and args.json:
        print(f"classify: not analysable: {result.unanalysable}", file=sys.stderr)
    return 0


# --- the study's answer ---------------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """One study's answer: the ROI's prediction (or the bodies', most suspicious first; none
    when the study cannot be analysed) and the SR the worker would send."""

    series: Series
    prediction: Prediction | None
    roi: Roi | None = None
    bodies: tuple[Body, ...] = ()
    unanalysable: str | None = None
    sr: pydicom.Dataset | None = None

    def to_json(self, classifier: Classifier, *, sr_path: Path | None) -> dict[str, Any]:
        prediction = self.prediction
        document: dict[str, Any] = {
            "mode": "reader" if self.roi is not None else "auto",
            "study_instance_uid": self.series.study_instance_uid,
            "series_instance_uid": self.series.series_instance_uid,
            "model": {
                "name": classifier.name,
                "version": classifier.version,
                "sha256": classifier.sha256,
                "task": checkpoint_task(classifier.meta),
                "demonstration": bool(classifier.meta.get("demonstration", False)),
            },
            "threshold": classifier.threshold,
            "patient_probability": None if prediction is None else prediction.patient_probability,
            "priority": "ROUTINE" if prediction is None else prediction.priority,
            "label": None if prediction is None else prediction.label,
            "slice_x_mm": [] if prediction is None else list(prediction.x_mm),
            "slice_probabilities": []
            if prediction is None
            else list(prediction.slice_probabilities),
            "domain": domain_of(prediction),
            "unanalysable": self.unanalysable,
            "sr": None if sr_path is None else str(sr_path),
        }
        if self.roi is not None:
            document["vertebra"] = self.roi.vertebra
        else:
            document["localiser"] = f"{LOCALISER_NAME} {LOCALISER_VERSION}"
            document["bodies"] = [
                {
                    "vertebra": body.roi.vertebra,
                    "confidence": body.confidence,
                    "probability": body.prediction.patient_probability,
                    "priority": body.prediction.priority,
                    "slice_x_mm": list(body.prediction.x_mm),
                    "slice_probabilities": list(body.prediction.slice_probabilities),
                    "domain": domain_of(body.prediction),
                    "roi": body.roi.to_json(),
                }
                for body in self.bodies
            ]
        return document


def domain_of(prediction: Prediction | None) -> dict[str, Any]:
    """The out-of-domain guard's verdict on a prediction (null members without a guard)."""
    if prediction is None:
        return {"score": None, "threshold": None, "in_domain": None}
    return {
        "score": prediction.domain_score,
        "threshold": prediction.domain_threshold,
        "in_domain": prediction.in_domain,
    }


def classify_roi(classifier: Classifier, series: Series, roi: Roi) -> Classified:
    """A reader's ROI, as :mod:`worker.pipeline` classifies it (volume, classification, SR)."""
    try:
        volume = classifier.load_volume(series.geometry, roi)
        classification = classifier.classify(volume, roi)
    except SeriesError as exc:
        raise ClassifyError(f"{type(exc).__name__}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ClassifyError(f"file missing: {exc.filename}") from exc
    prediction = classification.prediction
    sr = build_triage_sr(
        series.headers_of(volume.sop_instance_uids),
        TriageFinding(roi=roi, prediction=prediction),
        algorithm_info(classifier),
        annotation_key=f"classify:{roi.study_instance_uid}:{_digest(roi.to_json())}",
    )
    return Classified(series, prediction=prediction, roi=roi, sr=sr)


def classify_automatic(classifier: Classifier, series: Series) -> Classified:
    """Every vertebral body of the series, as :mod:`worker.automatic` classifies them."""
    try:
        overview = load_overview(series)
        proposals = propose(localise_bodies(overview), overview)
        volume = load_bodies(classifier, series, overview, proposals)
        bodies = classify_bodies(classifier, volume, proposals)
    except Unanalysable as exc:
        return Classified(series, prediction=None, unanalysable=str(exc))
    except (PermanentError, TransientError) as exc:
        raise ClassifyError(str(exc)) from exc
    sr = build_automatic_sr(
        list(series.headers),
        [TriageFinding(roi=body.roi, prediction=body.prediction) for body in bodies],
        algorithm_info(classifier),
        LocaliserInfo(name=LOCALISER_NAME, version=LOCALISER_VERSION),
        job_key=f"classify-auto:{series.study_instance_uid}:{series.series_instance_uid}",
    )
    return Classified(series, prediction=bodies[0].prediction, bodies=tuple(bodies), sr=sr)


def algorithm_info(classifier: Classifier) -> AlgorithmInfo:
    """The model as the worker names it in its SRs."""
    return AlgorithmInfo(
        name=classifier.name,
        version=classifier.version,
        device_uid=classifier.device_uid,
        demonstration=bool(classifier.meta.get("demonstration", False)),
    )


# --- inputs ---------------------------------------------------------------------------------


def _read_roi(path: Path) -> Roi:
    try:
        return Roi.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ClassifyError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassifyError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ClassifyError(f"{path}: not JSON: {exc}") from exc
    except (RoiError, TypeError, ValueError, KeyError) as exc:
        raise ClassifyError(f"{path}: not a valid ROI: {exc}") from exc


def _classifier(checkpoint: Path | None) -> Classifier:
    """The worker's classifier: its checkpoint (or ``checkpoint``), threshold and device."""
    import torch

    settings = load_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path = checkpoint if checkpoint is not None else default_checkpoint(settings, progress=True)
    device = None if settings.inference_device == "auto" else settings.inference_device
    try:
        return Classifier.load(path, device=device, threshold=settings.threshold)
    except FileNotFoundError as exc:
        raise ClassifyError(f"{path}: no such checkpoint") from exc
    except (OSError, CheckpointError, ValueError, KeyError) as exc:
        raise ClassifyError(f"{path}: {exc}") from exc


def _series_of(folder: Path, series_instance_uid: str | None) -> Series:
    """The named series of the folder, or (None) its CT series with the most images."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    groups = group_paths_by_series(files)
    if series_instance_uid is not None:
        paths = groups.get(series_instance_uid)
        if not paths:
            raise ClassifyError(
                f"no files of series {series_instance_uid} in {folder} "
                f"(found {len(groups)} other series)"
            )
    else:
        images = {uid: paths for uid, paths in groups.items() if _is_ct_image(paths[0])}
        if not images:
            raise ClassifyError(f"{folder}: no CT series found")
        series_instance_uid, paths = max(images.items(), key=lambda item: len(item[1]))
    try:
        study_instance_uid = str(
            pydicom.dcmread(
                paths[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            ).StudyInstanceUID
        )
        return read_series(
            paths, study_instance_uid, series_instance_uid, load_settings().series_selection
        )
    except (PermanentError, InvalidDicomError, AttributeError, OSError) as exc:
        raise ClassifyError(f"{folder}: {exc}") from exc


def _is_ct_image(path: Path) -> bool:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(header.get("Modality", "")) == "CT"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _print_text(document: dict[str, Any]) -> None:
    model = document["model"]
    print(f"model        {model['name']} {model['version']} (sha256 {model['sha256'][:16]}…)")
    print(f"series       {document['series_instance_uid']}")
    if document["unanalysable"]:
        print(f"not analysable: {document['unanalysable']}  -> ROUTINE (not flagged)")
        return
    for body in document.get("bodies", []):
        print(
            f"body {body['vertebra'] or '-':>4}  probability {body['probability']:.4f}  "
            f"{body['priority']:<7}  confidence {body['confidence']:.2f}  slices "
            + " ".join(f"{p:.3f}" for p in body["slice_probabilities"])
        )
    if document["mode"] == "reader":
        for x, p in zip(document["slice_x_mm"], document["slice_probabilities"], strict=True):
            print(f"slice x {x:8.2f} mm  probability {p:.4f}")
    domain = document["domain"]
    if domain["in_domain"] is False:
        print("domain       OUTSIDE the model's training domain")
    print(
        f"patient      probability {document['patient_probability']:.4f} "
        f"(threshold {document['threshold']:g}) -> {document['priority']}"
    )
    if document["sr"]:
        print(f"SR           {document['sr']}")
