"""The triage job, top to bottom: claim → load series → model → review series, key image,
SR → result → outbox.

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

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import RoiAnnotation, TriageResult
from dicom_node.broker.wake import DELIVERY, send_marked
from model.io.volume import SeriesError, Volume
from model.io.volume import load_volume as load_series_region
from model.serving.inference import Classification, Classifier
from model.serving.prediction import Prediction
from model.serving.preprocess import roi_region
from model.serving.roi import Roi
from worker import shadow
from worker.derived import review_region, union, write_review_series
from worker.errors import PermanentError, TransientError, describe_error
from worker.key_image import KeyFinding, headline, write_key_image
from worker.preview import render_preview_png, sagittal_context
from worker.runtime import LIVE, SHADOW, Role, WorkerRuntime
from worker.series import Series, open_series
from worker.sr import AlgorithmInfo, TriageFinding, build_triage_sr, sr_to_bytes

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
    """A claimed annotation: its ROI, and the key its result's identity derives from."""

    annotation_id: int
    attempt: int
    annotation_key: str
    roi: Roi


@dataclass(frozen=True)
class Report:
    """What a job wrote to storage: the SR and the preview of what the model saw."""

    sr_path: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str
    preview_path: str
    review_series_instance_uid: str | None = None  # the review series sent with the SR
    review_paths: tuple[str, ...] | None = None
    key_image_path: str | None = None  # the key image sent with the SR


@dataclass(frozen=True)
class Recorded:
    result_id: int
    delivery_ids: tuple[int, ...]


def run_triage(rt: WorkerRuntime, annotation_id: int) -> TriageOutcome:
    """Run one triage job to its end state (or to a retry)."""
    with transaction(rt.sessions) as session:
        claim = lifecycle.claim_annotation(
            session,
            annotation_id,
            worker_id=rt.worker_id,
            now=datetime.now(UTC),
            lease_s=rt.settings.job_lease_s,
            allow_unreceived=bool(rt.settings.dicomweb_source_url),
        )
    if claim is None:
        log.info("annotation %d not claimable now (done, taken or not ready)", annotation_id)
        return TriageOutcome(Outcome.SKIPPED, annotation_id)

    timings: dict[str, float] = {}
    try:
        with timed(timings, "load_s"):
            job = load_job(rt, claim)
            series = open_series(rt, job.roi.study_instance_uid, job.roi.series_instance_uid)
            volume = load_volume(rt, series, job.roi)
        with timed(timings, "inference_s"):
            classification = classify(rt, volume, job.roi)
        with timed(timings, "report_s"):
            report = write_report(rt, job, series, volume, classification)
        with timed(timings, "record_s"):
            recorded = record_result(rt, job, classification.prediction, report, timings)
        send_marked(rt.sessions, rt.send, DELIVERY, recorded.delivery_ids)
    except PermanentError as exc:
        return _fail(rt, annotation_id, str(exc))
    except (TransientError, OperationalError) as exc:
        return _retry_or_fail(rt, annotation_id, claim.attempt, describe_error(exc))
    except Exception as exc:  # a bug or an unforeseen failure: logged, retried, then failed
        log.exception("annotation %d: unexpected error", annotation_id)
        return _retry_or_fail(
            rt, annotation_id, claim.attempt, f"internal error: {describe_error(exc)}"
        )
    log.info(
        "annotation %d done: probability %.3f (%s), result %d, %.2f s",
        annotation_id,
        classification.prediction.patient_probability,
        classification.prediction.priority,
        recorded.result_id,
        sum(timings.values()),
    )
    shadow_triage(rt, job, series, volume, recorded.result_id)
    return TriageOutcome(Outcome.DONE, annotation_id, result_id=recorded.result_id)


# --- the steps -----------------------------------------------------------------------------


def load_job(rt: WorkerRuntime, claim: lifecycle.Claim) -> Job:
    """The claimed annotation's ROI (validated when it was stored)."""
    with rt.sessions() as session:
        annotation = session.get(RoiAnnotation, claim.annotation_id)
        if annotation is None:
            raise PermanentError(f"annotation {claim.annotation_id} no longer exists")
        key = f"{annotation.study_instance_uid}:{annotation.id}:{annotation.created_at.isoformat()}"
        return Job(
            annotation_id=annotation.id,
            attempt=claim.attempt,
            annotation_key=key,
            roi=annotation.roi(),
        )


def load_volume(rt: WorkerRuntime, series: Series, roi: Roi) -> Volume:
    """Decode only what the job needs, once: the ROI's slices, and the columns over the whole
    series that its review images need: the slabs of every slice position with the review
    series on (``REVIEW_SERIES``), else the central slab the key image is drawn on
    (``KEY_IMAGE``); geometry problems fail the job."""
    if rt.settings.review_series:
        review_xs: tuple[float, ...] = tuple(roi.slices_x_mm)
    elif rt.settings.key_image:
        review_xs = (roi.central_slice_x_mm,)
    else:
        review_xs = ()
    try:
        if not review_xs:
            return rt.classifier.load_volume(series.geometry, roi)
        params = rt.classifier.preprocess
        needed = union(
            roi_region(roi, lateral_reach_mm=params.lateral_reach_mm),
            review_region(series.geometry, review_xs, params),
        )
        return load_series_region(series.geometry, region=needed)
    except SeriesError as exc:
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
    except FileNotFoundError as exc:
        raise TransientError(f"stored file missing: {exc.filename}") from exc


def classify(
    rt: WorkerRuntime, volume: Volume, roi: Roi, *, classifier: Classifier | None = None
) -> Classification:
    """The network inputs (METHOD.md) and the model's answer for them (the live model's
    unless ``classifier`` is given)."""
    try:
        return (classifier or rt.classifier).classify(volume, roi)
    except SeriesError as exc:  # e.g. the ROI lies partly outside the volume
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc


def write_report(
    rt: WorkerRuntime,
    job: Job,
    series: Series,
    volume: Volume,
    classification: Classification,
    *,
    classifier: Classifier | None = None,
) -> Report:
    """The SR (built with highdicom) and the preview PNG, both stored durably."""
    classifier = classifier or rt.classifier
    prediction = classification.prediction
    algorithm = AlgorithmInfo(
        name=classifier.name,
        version=classifier.version,
        device_uid=classifier.device_uid,
        demonstration=bool(classifier.meta.get("demonstration", False)),
    )
    review = write_review_series(
        rt,
        series,
        job.roi.slices_x_mm,
        classifier.preprocess,
        job_key=job.annotation_key,
        software_version=algorithm.software_version,
        volume=volume,
    )
    key_image = write_key_image(
        rt,
        series,
        review,
        job.roi.central_slice_x_mm,
        [
            KeyFinding(
                job.roi.polygon_yz_mm,
                prediction.patient_probability,
                prediction.priority == "HIGH",
                job.roi.vertebra,
            )
        ],
        classifier.preprocess,
        result_line=headline(prediction.patient_probability, prediction.priority, job.roi.vertebra),
        job_key=job.annotation_key,
        model_version=classifier.version,
        software_version=algorithm.software_version,
        demonstration=algorithm.demonstration,
        volume=volume,
    )
    sr = build_triage_sr(
        series.headers_of(volume.sop_instance_uids),
        TriageFinding(roi=job.roi, prediction=prediction),
        algorithm,
        annotation_key=job.annotation_key,
        review=review.series if review else None,
        key_image=key_image.dataset if key_image else None,
    )
    stored = rt.store.write(
        job.roi.study_instance_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr_to_bytes(sr)
    )
    context, box = sagittal_context(volume, job.roi, margin_mm=8.0)
    png = render_preview_png(
        classification.inputs,
        prediction.x_mm,
        prediction.slice_probabilities,
        context=context,
        box_px=box,
        threshold=prediction.threshold,
    )
    preview_path = f"{job.roi.study_instance_uid}/previews/{sr.SOPInstanceUID}.png"
    rt.store.write_file(preview_path, png)
    return Report(
        sr_path=stored.relative_path,
        sr_series_instance_uid=str(sr.SeriesInstanceUID),
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
        preview_path=preview_path,
        review_series_instance_uid=review.series.series_instance_uid if review else None,
        review_paths=review.paths if review else None,
        key_image_path=key_image.path if key_image else None,
    )


def record_result(
    rt: WorkerRuntime,
    job: Job,
    prediction: Prediction,
    report: Report,
    timings: dict[str, float],
    *,
    classifier: Classifier | None = None,
    role: Role = LIVE,
) -> Recorded:
    """Result row, one delivery per destination and the annotation done: one transaction.
    A shadow result (the candidate's, ``role`` shadow) is only recorded: no delivery, and the
    annotation, done already, is left alone."""
    classifier = classifier or rt.classifier
    now = datetime.now(UTC)
    try:
        with transaction(rt.sessions) as session:
            live = role == LIVE
            if live and not lifecycle.holds_claim(session, job.annotation_id, rt.worker_id):
                raise TransientError("claim lost to another worker (lease expired)")
            result_id = _existing_result(session, job.annotation_id, classifier.version)
            if result_id is None:
                result = TriageResult(
                    annotation_id=job.annotation_id,
                    model_name=classifier.name,
                    model_version=classifier.version,
                    checkpoint_sha256=classifier.sha256 or None,
                    role=role,
                    patient_probability=prediction.patient_probability,
                    slice_x_mm=list(prediction.x_mm),
                    slice_probabilities=list(prediction.slice_probabilities),
                    label=prediction.label,
                    priority=prediction.priority,
                    threshold=prediction.threshold,
                    domain_score=prediction.domain_score,
                    domain_threshold=prediction.domain_threshold,
                    in_domain=prediction.in_domain,
                    demonstration_model=bool(classifier.meta.get("demonstration", False)),
                    sr_series_instance_uid=report.sr_series_instance_uid,
                    sr_sop_instance_uid=report.sr_sop_instance_uid,
                    sr_path=report.sr_path,
                    preview_path=report.preview_path,
                    review_series_instance_uid=report.review_series_instance_uid,
                    review_paths=list(report.review_paths) if report.review_paths else None,
                    key_image_path=report.key_image_path,
                    timings={key: round(value, 4) for key, value in timings.items()},
                    created_at=now,
                )
                session.add(result)
                session.flush()
                result_id = result.id
            delivery_ids: list[int] = []
            if live:
                delivery_ids = lifecycle.create_deliveries(
                    session, result_id, list(rt.settings.destinations), now=now
                )
                lifecycle.mark_deliveries_enqueued(session, delivery_ids, now)
                lifecycle.complete_annotation(session, job.annotation_id, now=now)
    except IntegrityError as exc:  # a concurrent run recorded the same key first
        raise TransientError("result recorded concurrently") from exc
    return Recorded(result_id, tuple(delivery_ids))


def shadow_triage(
    rt: WorkerRuntime, job: Job, series: Series, volume: Volume, live_result_id: int
) -> None:
    """Shadow mode: the candidate on the same ROI and volume; its result recorded (role
    shadow) with its SR and preview stored, never delivered. Never raises: a failure is
    logged and recorded on the live result (:func:`worker.shadow.run_candidate`)."""

    def run(candidate: Classifier) -> int:
        timings: dict[str, float] = {}
        with timed(timings, "load_s"):
            reach = rt.classifier.preprocess.lateral_reach_mm
            seen = (
                volume
                if candidate.preprocess.lateral_reach_mm <= reach
                else candidate.load_volume(series.geometry, job.roi)
            )
        with timed(timings, "inference_s"):
            classification = classify(rt, seen, job.roi, classifier=candidate)
        with timed(timings, "report_s"):
            report = write_report(rt, job, series, seen, classification, classifier=candidate)
        with timed(timings, "record_s"):
            prediction = classification.prediction
            recorded = record_result(
                rt, job, prediction, report, timings, classifier=candidate, role=SHADOW
            )
        return recorded.result_id

    shadow.run_candidate(rt, live_result_id, f"annotation {job.annotation_id}", run)


def _existing_result(session: Session, annotation_id: int, model_version: str) -> int | None:
    return session.scalar(
        select(TriageResult.id).where(
            TriageResult.annotation_id == annotation_id,
            TriageResult.model_version == model_version,
        )
    )


# --- failures --------------------------------------------------------------------------------


def _fail(rt: WorkerRuntime, annotation_id: int, reason: str) -> TriageOutcome:
    with transaction(rt.sessions) as session:
        lifecycle.fail_annotation(
            session, annotation_id, worker_id=rt.worker_id, reason=reason, now=datetime.now(UTC)
        )
    log.warning("annotation %d failed: %s", annotation_id, reason)
    return TriageOutcome(Outcome.FAILED, annotation_id, reason=reason)


def _retry_or_fail(
    rt: WorkerRuntime, annotation_id: int, attempt: int, reason: str
) -> TriageOutcome:
    if attempt >= rt.settings.job_max_attempts:
        return _fail(rt, annotation_id, f"gave up after {attempt} attempts: {reason}")
    delay = lifecycle.backoff_s(attempt, base_s=rt.settings.delivery_backoff_s, max_s=300.0)
    try:
        with transaction(rt.sessions) as session:
            lifecycle.release_annotation(
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


class timed:
    """Adds the seconds its block took to ``timings[key]``."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = time.perf_counter() - self.start
