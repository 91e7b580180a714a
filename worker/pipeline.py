"""The triage job, top to bottom: claim → load series → model → result → SR → outbox.

Runs without Celery (``worker.tasks`` is a thin shell around :func:`run_triage`). The
database is the source of truth: the claim is taken there, and the result, its deliveries
and the annotation's new state are committed in one transaction. A result is keyed by
(annotation, model version) and the SR's UIDs are derived from that key, so a re-run
re-sends the same report instead of writing a second one.

Finding the series' stored images, retrieving them by WADO-RS when the node never
received them, and checking the site's selection rules: :mod:`worker.series`.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dicom_node.archive.db import transaction
from dicom_node.archive.schema import AnnotationState, RoiAnnotation, TriageResult
from dicom_node.broker.wake import DELIVER_TASK, DELIVERY_QUEUE, mark_deliveries_enqueued, publish
from worker.claims import (
    backoff_s,
    claim_annotation,
    fail_annotation,
    release_for_retry,
    still_holds,
)
from worker.delivery import create_deliveries
from worker.errors import PermanentError, TransientError
from worker.runtime import WorkerRuntime
from worker.series import (
    SeriesNotReceived,
    check_series_selection,
    retrieve_series,
    stored_image_paths,
)
from worker.sr import AlgorithmInfo, TriageFinding, build_triage_sr, sr_to_bytes

if TYPE_CHECKING:
    from model.io.volume import Volume
    from model.serving.inference import Prediction
    from model.serving.roi import RoiAnnotation as ModelRoi

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    DONE = "done"
    SKIPPED = "skipped"  # not claimable: done already, claimed by another worker, not ready
    RETRY = "retry"  # transient failure: back to pending, retry after ``retry_in_s``
    FAILED = "failed"  # permanent failure (or attempts exhausted), reason kept


@dataclass(frozen=True)
class TriageOutcome:
    outcome: Outcome
    annotation_id: int
    result_id: int | None = None
    reason: str | None = None
    retry_in_s: float | None = None


@dataclass(frozen=True)
class Job:
    """A claimed annotation and the files of its series, as plain values."""

    annotation_id: int
    attempt: int
    annotation_key: str
    roi_json: dict[str, object]
    study_instance_uid: str
    series_files: tuple[Path, ...]


def run_triage(rt: WorkerRuntime, annotation_id: int) -> TriageOutcome:
    """Run one triage job to its end state (or to a retry)."""
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        claim = claim_annotation(
            session,
            annotation_id,
            worker_id=rt.worker_id,
            now=now,
            lease_s=rt.settings.job_lease_s,
            allow_unreceived=bool(rt.settings.dicomweb_source_url),
        )
    if claim is None:
        log.info("annotation %d not claimable now (done, taken or not ready)", annotation_id)
        return TriageOutcome(Outcome.SKIPPED, annotation_id)

    timings: dict[str, float] = {}
    try:
        with _timed(timings, "load_s"):
            job = load_job(rt, annotation_id, claim.attempt)
            roi = to_model_roi(job)
            volume = load_volume(rt, job, roi)
        with _timed(timings, "inference_s"):
            inputs, prediction = classify(rt, volume, roi)
        with _timed(timings, "report_s"):
            sr_path, sr_series_uid, sr_uid = write_report(rt, job, volume, prediction)
            preview_path = write_preview(rt, job, volume, roi, inputs, prediction, sr_uid)
        with _timed(timings, "record_s"):
            result_id, delivery_ids = record_result(
                rt, job, prediction, sr_path, sr_series_uid, sr_uid, preview_path, timings
            )
        wake_deliveries(rt, delivery_ids)
    except PermanentError as exc:
        return _fail(rt, annotation_id, str(exc))
    except (TransientError, OperationalError) as exc:
        return _retry_or_fail(rt, annotation_id, claim.attempt, _describe(exc))
    except Exception as exc:  # a bug or an unforeseen failure: logged, retried, then failed
        log.exception("annotation %d: unexpected error", annotation_id)
        return _retry_or_fail(rt, annotation_id, claim.attempt, f"internal error: {_describe(exc)}")
    log.info(
        "annotation %d done: probability %.3f (%s), result %d, %.2f s",
        annotation_id,
        prediction.patient_probability,
        prediction.priority,
        result_id,
        sum(timings.values()),
    )
    return TriageOutcome(Outcome.DONE, annotation_id, result_id=result_id)


# --- the steps -----------------------------------------------------------------------------


def load_job(rt: WorkerRuntime, annotation_id: int, attempt: int) -> Job:
    """The annotation and the stored files of the series it names (retrieved from the
    PACS by WADO-RS first when the node never received it and a source is configured)."""
    try:
        return _load_job(rt, annotation_id, attempt)
    except SeriesNotReceived as missing:
        if not rt.settings.dicomweb_source_url:
            raise
        retrieve_series(rt, missing.study_instance_uid, missing.series_instance_uid)
        return _load_job(rt, annotation_id, attempt)


def _load_job(rt: WorkerRuntime, annotation_id: int, attempt: int) -> Job:
    with rt.sessions() as session:
        annotation = session.get(RoiAnnotation, annotation_id)
        if annotation is None:
            raise PermanentError(f"annotation {annotation_id} no longer exists")
        paths = stored_image_paths(
            session, annotation.study_instance_uid, annotation.series_instance_uid
        )
        key = f"{annotation.study_instance_uid}:{annotation.id}:{annotation.created_at.isoformat()}"
        job = Job(
            annotation_id=annotation.id,
            attempt=attempt,
            annotation_key=key,
            roi_json=annotation.roi_json(),
            study_instance_uid=annotation.study_instance_uid,
            series_files=tuple(rt.store.absolute(path) for path in paths),
        )
    if not job.series_files:
        raise PermanentError(f"series {job.roi_json['series_instance_uid']} holds no image")
    check_series_selection(job.series_files[0], rt.settings.series_selection)
    return job


def to_model_roi(job: Job) -> ModelRoi:
    from model.serving.roi import RoiAnnotation as ModelRoi
    from model.serving.roi import RoiError

    try:
        return ModelRoi.from_json(job.roi_json)
    except RoiError as exc:
        raise PermanentError(f"invalid ROI: {exc}") from exc


def load_volume(rt: WorkerRuntime, job: Job, roi: ModelRoi) -> Volume:
    """Decode only the slices the ROI needs; geometry problems fail the job."""
    from model.io.volume import SeriesError

    try:
        return rt.classifier.load_volume(list(job.series_files), roi)
    except SeriesError as exc:
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
    except FileNotFoundError as exc:
        raise TransientError(f"stored file missing: {exc.filename}") from exc


def classify(rt: WorkerRuntime, volume: Volume, roi: ModelRoi) -> tuple[np.ndarray, Prediction]:
    """The network inputs (METHOD.md) and the model's answer for them."""
    from model.io.volume import SeriesError
    from model.serving.inference import prediction_from_probabilities
    from model.serving.preprocess import build_inputs

    classifier = rt.classifier
    try:
        inputs = build_inputs(volume, roi, classifier.preprocess)
    except SeriesError as exc:  # e.g. the ROI lies partly outside the volume
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
    probabilities = classifier.predict_inputs(inputs)
    prediction = prediction_from_probabilities(
        roi.slices_x_mm, probabilities.tolist(), classifier.threshold
    )
    return inputs, prediction


def write_preview(
    rt: WorkerRuntime,
    job: Job,
    volume: Volume,
    roi: ModelRoi,
    inputs: np.ndarray,
    prediction: Prediction,
    sr_uid: str,
) -> str:
    """A PNG of what the model saw (for the worklist page), stored beside the SR."""
    from worker.preview import render_preview_png, sagittal_context

    context, box = sagittal_context(volume, roi, margin_mm=8.0)
    png = render_preview_png(
        inputs,
        prediction.x_mm,
        prediction.slice_probabilities,
        context=context,
        box_px=box,
        threshold=prediction.threshold,
    )
    relative = f"{job.study_instance_uid}/previews/{sr_uid}.png"
    rt.store.write_file(relative, png)
    return relative


def write_report(
    rt: WorkerRuntime, job: Job, volume: Volume, prediction: Prediction
) -> tuple[str, str, str]:
    """Build the SR with highdicom and store it durably; returns (path, series UID, SOP UID)."""
    classifier = rt.classifier
    used = set(volume.sop_instance_uids)
    evidence = []
    for path in job.series_files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.SOPInstanceUID in used:
            evidence.append(header)
    algorithm = AlgorithmInfo(
        name=classifier.name,
        version=classifier.version,
        device_uid=classifier.device_uid,
        demonstration=bool(classifier.meta.get("demonstration", False)),
    )
    finding = TriageFinding(
        polygon_yz_mm=tuple((float(y), float(z)) for y, z in job.roi_json["polygon_yz_mm"]),  # type: ignore[attr-defined]
        slices_x_mm=prediction.x_mm,
        slice_probabilities=prediction.slice_probabilities,
        patient_probability=prediction.patient_probability,
        label=prediction.label,
        priority=prediction.priority,
        threshold=prediction.threshold,
        vertebra=job.roi_json.get("vertebra"),  # type: ignore[arg-type]
    )
    sr = build_triage_sr(evidence, finding, algorithm, annotation_key=job.annotation_key)
    stored = rt.store.write(
        job.study_instance_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr_to_bytes(sr)
    )
    return stored.relative_path, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)


def record_result(
    rt: WorkerRuntime,
    job: Job,
    prediction: Prediction,
    sr_path: str,
    sr_series_uid: str,
    sr_uid: str,
    preview_path: str | None,
    timings: dict[str, float],
) -> tuple[int, list[int]]:
    """Result row, one delivery per destination and the annotation done: one transaction."""
    classifier = rt.classifier
    now = datetime.now(UTC)
    try:
        with transaction(rt.sessions) as session:
            if not still_holds(session, job.annotation_id, rt.worker_id):
                raise TransientError("claim lost to another worker (lease expired)")
            result_id = _existing_result(session, job.annotation_id, classifier.version)
            if result_id is None:
                result = TriageResult(
                    annotation_id=job.annotation_id,
                    model_name=classifier.name,
                    model_version=classifier.version,
                    patient_probability=prediction.patient_probability,
                    slice_x_mm=list(prediction.x_mm),
                    slice_probabilities=list(prediction.slice_probabilities),
                    label=prediction.label,
                    priority=prediction.priority,
                    threshold=prediction.threshold,
                    demonstration_model=bool(classifier.meta.get("demonstration", False)),
                    sr_series_instance_uid=sr_series_uid,
                    sr_sop_instance_uid=sr_uid,
                    sr_path=sr_path,
                    preview_path=preview_path,
                    timings={key: round(value, 4) for key, value in timings.items()},
                    created_at=now,
                )
                session.add(result)
                session.flush()
                result_id = result.id
            delivery_ids = create_deliveries(
                session, result_id, list(rt.settings.destinations), now=now
            )
            mark_deliveries_enqueued(session, delivery_ids, now)
            annotation = session.get(RoiAnnotation, job.annotation_id)
            assert annotation is not None
            annotation.state = AnnotationState.DONE
            annotation.claimed_by = None
            annotation.claimed_until = None
            annotation.failure_reason = None
            annotation.updated_at = now
    except IntegrityError as exc:  # a concurrent run recorded the same key first
        raise TransientError("result recorded concurrently") from exc
    return result_id, delivery_ids


def _existing_result(session: Session, annotation_id: int, model_version: str) -> int | None:
    return session.scalar(
        select(TriageResult.id).where(
            TriageResult.annotation_id == annotation_id,
            TriageResult.model_version == model_version,
        )
    )


def wake_deliveries(rt: WorkerRuntime, delivery_ids: list[int]) -> None:
    """Send the deliveries' messages now; the node's scheduler re-sends any that are lost."""
    if rt.send is not None and delivery_ids:
        publish(rt.send, DELIVER_TASK, delivery_ids, DELIVERY_QUEUE)


# --- failures --------------------------------------------------------------------------------


def _fail(rt: WorkerRuntime, annotation_id: int, reason: str) -> TriageOutcome:
    with transaction(rt.sessions) as session:
        fail_annotation(
            session, annotation_id, worker_id=rt.worker_id, reason=reason, now=datetime.now(UTC)
        )
    log.warning("annotation %d failed: %s", annotation_id, reason)
    return TriageOutcome(Outcome.FAILED, annotation_id, reason=reason)


def _retry_or_fail(
    rt: WorkerRuntime, annotation_id: int, attempt: int, reason: str
) -> TriageOutcome:
    if attempt >= rt.settings.job_max_attempts:
        return _fail(rt, annotation_id, f"gave up after {attempt} attempts: {reason}")
    delay = backoff_s(attempt, base_s=rt.settings.delivery_backoff_s, max_s=300.0)
    try:
        with transaction(rt.sessions) as session:
            release_for_retry(
                session,
                annotation_id,
                worker_id=rt.worker_id,
                reason=reason,
                now=datetime.now(UTC),
            )
    except OperationalError:
        log.warning("annotation %d: database unavailable; its lease will expire", annotation_id)
    log.warning(
        "annotation %d: attempt %d failed (%s); retry in %.0f s",
        annotation_id,
        attempt,
        reason,
        delay,
    )
    return TriageOutcome(Outcome.RETRY, annotation_id, reason=reason, retry_in_s=delay)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _timed:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = time.perf_counter() - self.start
