"""The automatic job, top to bottom: claim → choose the series → localise every vertebral body
→ classify them all → result and flag → review series, key image, SR and preview → outbox.

Runs without Celery (``worker.tasks.triage_study`` is a thin shell around
:func:`run_automatic`). The study's probability is the maximum over its bodies (each body's
the maximum over its slices, as Li et al. take the patient's), and the flag is raised on the
most suspicious body.

The flag does not wait for the report. The bodies, the result and one delivery per flag sink
(HL7, Orthanc metadata, webhook) are committed in one transaction and sent at once; the
worklist shows the flag from then on. The report (review series, key image, SR, preview) is
built next, and its files, one delivery per PACS destination and the job's end are committed
in a second transaction. Between the two the job stays processing under its lease: a worker
that dies there leaves it to expire, and the sweeper's next claim runs the job again, finds
the result and its flag deliveries recorded, and writes the same report (the result is keyed
by (job, model version) and every UID of the report derives from that key), so nothing is
lost and nothing is sent twice.

What cannot be analysed is said, never guessed: a study without a CT series, a series the
localiser finds no spine in (a head CT), too few slices, a field of view that cuts every body,
metal — the job ends UNANALYSABLE with the reason, the study is not flagged, and the worklist
says "could not analyse" and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import AutoJob, Instance, RoiAnnotation, Study, TriageResult
from dicom_node.archive.schema import Series as SeriesRow
from dicom_node.broker.wake import DELIVERY, send_marked
from dicom_node.dicom.ingest import SR_SOP_CLASSES
from model.io.volume import SeriesError, Volume
from model.serving.checkpoint import checkpoint_task
from model.serving.inference import Classifier
from model.serving.localiser import (
    LOCALISER_NAME,
    LOCALISER_VERSION,
    Localisation,
    Proposal,
    localise,
    propose_rois,
)
from model.serving.overview import load_for_rois
from model.serving.overview import load_overview as read_overview
from model.serving.prediction import (
    Prediction,
    outside_domain,
    series_outside_domain,
    suspicion_order,
)
from model.serving.preprocess import build_inputs
from model.serving.roi import Roi
from worker import shadow
from worker.derived import slice_positions, write_review_series
from worker.destinations import carries_report
from worker.errors import PermanentError, TransientError
from worker.key_image import KeyFinding, headline, write_key_image
from worker.pipeline import Outcome, describe_error, timed
from worker.preview import render_overview_png
from worker.runtime import LIVE, SHADOW, Role, WorkerRuntime
from worker.series import Series, open_series
from worker.sr import AlgorithmInfo, TriageFinding, result_uids, sr_to_bytes
from worker.sr_automatic import LocaliserInfo, build_automatic_sr

log = logging.getLogger(__name__)

LOCALISER = f"{LOCALISER_NAME} {LOCALISER_VERSION}"
SLICES_PER_BODY = 5


@dataclass(frozen=True)
class AutomaticOutcome:
    outcome: Outcome
    job_id: int
    result_id: int | None = None
    reason: str | None = None
    retry_in_s: float | None = None
    unanalysable: str | None = None


@dataclass(frozen=True)
class Body:
    """One proposed body and the classifier's answer for it."""

    roi: Roi
    confidence: float
    prediction: Prediction


class Unanalysable(Exception):
    """Nothing in the study can be analysed; the message says why (shown to the reader)."""


def run_automatic(rt: WorkerRuntime, job_id: int) -> AutomaticOutcome:
    """Run one automatic job to its end state (or to a retry)."""
    with transaction(rt.sessions) as session:
        claim = lifecycle.claim_auto_job(
            session,
            job_id,
            worker_id=rt.worker_id,
            now=datetime.now(UTC),
            lease_s=rt.settings.job_lease_s,
        )
    if claim is None:
        log.info("automatic job %d not claimable now (done, taken or not ready)", job_id)
        return AutomaticOutcome(Outcome.SKIPPED, job_id)
    timings: dict[str, float] = {}
    series_uid: str | None = None
    try:
        _require_automatic_model(rt)
        study_uid, job_key = _job(rt, job_id)
        with timed(timings, "load_s"):
            series_uid = choose_series(rt, study_uid)
            series = open_series(rt, study_uid, series_uid)
            overview = load_overview(series)
        with timed(timings, "localise_s"):
            proposals = propose(localise_bodies(overview), overview)
        with timed(timings, "load_bodies_s"):
            volume = load_bodies(rt.classifier, series, overview, proposals)
        with timed(timings, "inference_s"):
            bodies = classify_bodies(rt.classifier, volume, proposals)
        # The flag first: the result and its flag sinks' deliveries committed, and sent, before
        # the report is built; the job stays processing until the report is recorded.
        with timed(timings, "record_s"):
            result_id, flag_ids = record_result(rt, job_id, series_uid, bodies, job_key, timings)
        send_marked(rt.sessions, rt.send, DELIVERY, flag_ids)
        with timed(timings, "report_s"):
            report = write_report(rt, job_key, series, overview, bodies, volume=volume)
        delivery_ids = record_report(rt, job_id, result_id, series_uid, report, timings)
        send_marked(rt.sessions, rt.send, DELIVERY, delivery_ids)
    except Unanalysable as exc:
        return _unanalysable(rt, job_id, str(exc), series_uid)
    except PermanentError as exc:
        return _fail(rt, job_id, str(exc))
    except (TransientError, OperationalError) as exc:
        return _retry_or_fail(rt, job_id, claim.attempt, describe_error(exc))
    except Exception as exc:  # a bug or an unforeseen failure: logged, retried, then failed
        log.exception("automatic job %d: unexpected error", job_id)
        return _retry_or_fail(rt, job_id, claim.attempt, f"internal error: {describe_error(exc)}")
    top = bodies[0]
    log.info(
        "automatic job %d done: %d bodies, top %.3f (%s) on %s, result %d, %.2f s",
        job_id,
        len(bodies),
        top.prediction.patient_probability,
        top.prediction.priority,
        top.roi.vertebra or "an unlabelled body",
        result_id,
        sum(timings.values()),
    )
    shadow_automatic(rt, job_id, job_key, series, overview, volume, proposals, bodies, result_id)
    return AutomaticOutcome(Outcome.DONE, job_id, result_id=result_id)


# --- the steps -------------------------------------------------------------------------------


def _require_automatic_model(rt: WorkerRuntime, classifier: Classifier | None = None) -> None:
    """A checkpoint trained only on readers' ROIs of fractures has never seen a normal
    vertebra: the maximum over a study's bodies would flag every study."""
    classifier = classifier or rt.classifier
    task = checkpoint_task(classifier.meta)
    if task != "automatic":
        raise PermanentError(
            f"model {classifier.name} {classifier.version} was trained for the task "
            f"{task!r}, not for automatic triage (it has never seen normal vertebrae); "
            "train with normal bodies or set AUTO_ROI=off"
        )


def _job(rt: WorkerRuntime, job_id: int) -> tuple[str, str]:
    with rt.sessions() as session:
        job = session.get(AutoJob, job_id)
        if job is None:
            raise PermanentError(f"automatic job {job_id} no longer exists")
        key = f"auto:{job.study_instance_uid}:{job.id}:{job.created_at.isoformat()}"
        return job.study_instance_uid, key


def choose_series(rt: WorkerRuntime, study_instance_uid: str) -> str:
    """The study's CT series with the most images (the one a reader would page through)."""
    with rt.sessions() as session:
        images = (
            select(func.count(Instance.id))
            .where(
                Instance.series_id == SeriesRow.id,
                Instance.sop_class_uid.not_in([str(uid) for uid in SR_SOP_CLASSES]),
            )
            .scalar_subquery()
        )
        row = session.execute(
            select(SeriesRow.series_instance_uid, images.label("images"))
            .join(Study, SeriesRow.study_id == Study.id)
            .where(Study.study_instance_uid == study_instance_uid, SeriesRow.modality == "CT")
            .order_by(images.desc(), SeriesRow.id)
            .limit(1)
        ).one_or_none()
    if row is None or row.images == 0:
        raise Unanalysable("no CT series in the study")
    return str(row.series_instance_uid)


def load_overview(series: Series) -> Volume:
    """The whole series as the localiser reads it (:func:`model.serving.overview.overview_plan`:
    JPEG 2000 at reduced resolution and slice density, other codecs whole, once)."""
    try:
        return read_overview(series.geometry)
    except SeriesError as exc:
        raise Unanalysable(f"the series cannot be read as a volume: {exc}") from exc
    except FileNotFoundError as exc:
        raise TransientError(f"stored file missing: {exc.filename}") from exc


def propose(localisation: Localisation, overview: Volume) -> list[Proposal]:
    return propose_rois(
        localisation,
        study_instance_uid=overview.study_instance_uid,
        series_instance_uid=overview.series_instance_uid,
        slices=SLICES_PER_BODY,
    )


def load_bodies(
    classifier: Classifier,
    series: Series,
    overview: Volume,
    proposals: Sequence[Proposal],
) -> Volume:
    """The full-resolution voxels the classifier needs: the overview itself when it is the
    whole series at full resolution, else one region covering every proposed ROI. Only what
    the flag waits for: the review series, built after the flag, reads the columns its images
    need itself (:func:`worker.derived.write_review_series`)."""
    rois = [p.roi for p in proposals]
    try:
        return load_for_rois(series.geometry, overview, rois, classifier.preprocess)
    except SeriesError as exc:
        raise Unanalysable(f"the series cannot be read as a volume: {exc}") from exc
    except FileNotFoundError as exc:
        raise TransientError(f"stored file missing: {exc.filename}") from exc


def review_positions(rois: Sequence[Roi]) -> list[float]:
    """Where the review series of an automatic job has its images: the distinct central slice
    positions of the bodies, right to left. The SR draws each body's box on the image at its
    central slice (the one its SCOORD3D polygon lies in); the images span the whole field of
    view, so the bodies at one position share one image (most of a straight spine's bodies
    share one or two)."""
    return slice_positions([[roi.central_slice_x_mm] for roi in rois])


def localise_bodies(volume: Volume) -> Localisation:
    localisation = localise(volume)
    if localisation.unanalysable:
        raise Unanalysable(localisation.unanalysable)
    if not localisation.bodies:
        raise Unanalysable("no vertebral body found in the field of view")
    return localisation


def classify_bodies(
    classifier: Classifier, volume: Volume, proposals: Sequence[Proposal]
) -> list[Body]:
    """Every proposed body classified in one batch; most suspicious first. A body whose ROI
    reaches outside the series is left out (logged); none left is unanalysable. When the
    median of the bodies' domain scores lies above the threshold, the series is outside the
    model's training domain and every body is reported so (never flagged)."""
    kept, inputs = [], []
    for proposal in proposals:
        try:
            inputs.append(build_inputs(volume, proposal.roi, classifier.preprocess))
        except SeriesError as exc:
            log.info("body %s left out: %s", proposal.roi.vertebra or "?", exc)
            continue
        kept.append(proposal)
    if not kept:
        raise Unanalysable("the field of view cuts every vertebral body found")
    scores = classifier.score_inputs(np.concatenate(inputs))
    bodies, start = [], 0
    for proposal, body_inputs in zip(kept, inputs, strict=True):
        end = start + len(body_inputs)
        domain = None if scores.domain_scores is None else scores.domain_scores[start:end]
        prediction = classifier.prediction(
            proposal.roi.slices_x_mm,
            scores.probabilities[start:end].tolist(),
            None if domain is None else domain.tolist(),
        )
        bodies.append(Body(proposal.roi, proposal.confidence, prediction))
        start = end
    if series_outside_domain([body.prediction for body in bodies]):
        # most bodies lie outside the training domain: the series does, none of it is trusted
        log.info("series outside the model's training domain (median of its bodies' scores)")
        bodies = [replace(body, prediction=outside_domain(body.prediction)) for body in bodies]
    # A flagged body first (a body outside the training domain is never flagged), then the
    # bodies the model may judge by probability, then those outside its training domain.
    bodies.sort(key=lambda body: suspicion_order(body.prediction))
    return bodies


@dataclass(frozen=True)
class AutomaticReport:
    sr_path: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str
    preview_path: str
    review_series_instance_uid: str | None = None  # the review series sent with the SR
    review_paths: tuple[str, ...] | None = None
    key_image_path: str | None = None  # the key image sent with the SR


def write_report(
    rt: WorkerRuntime,
    job_key: str,
    series: Series,
    overview: Volume,
    bodies: Sequence[Body],
    *,
    classifier: Classifier | None = None,
    volume: Volume | None = None,
) -> AutomaticReport:
    """The review series, the key image, one SR for the whole study (a group per body) and
    the sagittal overview with every box coloured by its probability, all stored durably."""
    classifier = classifier or rt.classifier
    algorithm = AlgorithmInfo(
        name=classifier.name,
        version=classifier.version,
        device_uid=classifier.device_uid,
        demonstration=bool(classifier.meta.get("demonstration", False)),
    )
    review = write_review_series(
        rt,
        series,
        review_positions([body.roi for body in bodies]),
        classifier.preprocess,
        job_key=job_key,
        software_version=algorithm.software_version,
        volume=volume,
    )
    top = bodies[0]  # the most suspicious body: the key image is its central slice
    key_image = write_key_image(
        rt,
        series,
        review,
        top.roi.central_slice_x_mm,
        [
            KeyFinding(
                body.roi.polygon_yz_mm,
                body.prediction.patient_probability,
                body.prediction.priority == "HIGH",
                body.roi.vertebra,
            )
            for body in bodies
        ],
        classifier.preprocess,
        result_line=headline(
            top.prediction.patient_probability, top.prediction.priority, top.roi.vertebra
        ),
        job_key=job_key,
        model_version=classifier.version,
        software_version=algorithm.software_version,
        demonstration=algorithm.demonstration,
        volume=volume,
    )
    sr = build_automatic_sr(
        list(series.headers),
        [TriageFinding(roi=body.roi, prediction=body.prediction) for body in bodies],
        algorithm,
        LocaliserInfo(name=LOCALISER_NAME, version=LOCALISER_VERSION),
        job_key=job_key,
        review=review.series if review else None,
        key_image=key_image.dataset if key_image else None,
    )
    study_uid = overview.study_instance_uid
    stored = rt.store.write(study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr_to_bytes(sr))
    png = render_overview_png(
        overview, [(body.roi, body.prediction.patient_probability) for body in bodies]
    )
    preview_path = f"{study_uid}/previews/{sr.SOPInstanceUID}.png"
    rt.store.write_file(preview_path, png)
    return AutomaticReport(
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
    job_id: int,
    series_uid: str,
    bodies: Sequence[Body],
    job_key: str,
    timings: dict[str, float],
    *,
    report: AutomaticReport | None = None,
    classifier: Classifier | None = None,
    role: Role = LIVE,
    annotation_ids: Sequence[int] | None = None,
) -> tuple[int, list[int]]:
    """The bodies as annotations, the result (on the most suspicious body) and one delivery
    per flag sink (:func:`worker.destinations.carries_report`): one transaction, before the
    report exists (``report`` None; the SR's UIDs are known from the job key). The job stays
    processing: :func:`record_report` ends it. Run again for the same job (a worker died
    before the report was recorded), it finds the result and its deliveries recorded.

    A shadow result (the candidate's, role shadow) is recorded with its ``report``, naming
    the live result's annotations of its bodies (``annotation_ids``, in the order of
    ``bodies``): no delivery, the job, done already, left alone."""
    classifier = classifier or rt.classifier
    now = datetime.now(UTC)
    live = role == LIVE
    sr_series_uid, sr_sop_uid = result_uids(job_key, classifier.version)
    try:
        with transaction(rt.sessions) as session:
            if live and not lifecycle.holds_auto_job(session, job_id, rt.worker_id):
                raise TransientError("claim lost to another worker (lease expired)")
            if annotation_ids is None:
                annotation_ids = lifecycle.propose_bodies(
                    session,
                    job_id,
                    [lifecycle.ProposedBody(body.roi, body.confidence) for body in bodies],
                    annotator=LOCALISER,
                    now=now,
                )
            result_id = session.scalar(
                select(TriageResult.id).where(
                    TriageResult.auto_job_id == job_id,
                    TriageResult.model_version == classifier.version,
                )
            )
            if result_id is None:
                top = bodies[0].prediction
                result = TriageResult(
                    annotation_id=annotation_ids[0],
                    auto_job_id=job_id,
                    model_name=classifier.name,
                    model_version=classifier.version,
                    checkpoint_sha256=classifier.sha256 or None,
                    role=role,
                    patient_probability=top.patient_probability,
                    slice_x_mm=list(top.x_mm),
                    slice_probabilities=list(top.slice_probabilities),
                    label=top.label,
                    priority=top.priority,
                    threshold=top.threshold,
                    domain_score=top.domain_score,
                    domain_threshold=top.domain_threshold,
                    in_domain=top.in_domain,
                    demonstration_model=bool(classifier.meta.get("demonstration", False)),
                    sr_series_instance_uid=sr_series_uid,
                    sr_sop_instance_uid=sr_sop_uid,
                    timings=_rounded(timings),
                    bodies=[
                        {
                            "annotation_id": annotation_id,
                            "vertebra": body.roi.vertebra,
                            "confidence": round(body.confidence, 4),
                            "probability": body.prediction.patient_probability,
                            "priority": body.prediction.priority,
                            "slice_x_mm": list(body.prediction.x_mm),
                            "slice_probabilities": list(body.prediction.slice_probabilities),
                            "domain_score": body.prediction.domain_score,
                            "in_domain": body.prediction.in_domain,
                        }
                        for annotation_id, body in zip(annotation_ids, bodies, strict=True)
                    ],
                    created_at=now,
                )
                if report is not None:
                    _set_report(result, report)
                session.add(result)
                session.flush()
                result_id = result.id
            delivery_ids: list[int] = []
            if live:
                flags = [d for d in rt.settings.destinations if not carries_report(d.kind)]
                delivery_ids = lifecycle.create_deliveries(session, result_id, flags, now=now)
                lifecycle.mark_deliveries_enqueued(session, delivery_ids, now)
    except IntegrityError as exc:  # a concurrent run recorded the same key first
        raise TransientError("result recorded concurrently") from exc
    return result_id, delivery_ids


def record_report(
    rt: WorkerRuntime,
    job_id: int,
    result_id: int,
    series_uid: str,
    report: AutomaticReport,
    timings: dict[str, float],
) -> list[int]:
    """The report's files on the result, one delivery per destination that receives the SR
    (the review series and the key image go before it) and the job done: one transaction."""
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        if not lifecycle.holds_auto_job(session, job_id, rt.worker_id):
            raise TransientError("claim lost to another worker (lease expired)")
        result = session.get(TriageResult, result_id)
        if result is None:
            raise TransientError(f"result {result_id} vanished before its report was recorded")
        if result.sr_sop_instance_uid != report.sr_sop_instance_uid:
            raise RuntimeError("the report's SR is not the one its result names")
        _set_report(result, report)
        result.timings = _rounded({**(result.timings or {}), **timings})
        pacs = [d for d in rt.settings.destinations if carries_report(d.kind)]
        delivery_ids = lifecycle.create_deliveries(session, result_id, pacs, now=now)
        lifecycle.mark_deliveries_enqueued(session, delivery_ids, now)
        lifecycle.complete_auto_job(
            session, job_id, series_instance_uid=series_uid, localiser=LOCALISER, now=now
        )
    return delivery_ids


def _set_report(result: TriageResult, report: AutomaticReport) -> None:
    result.sr_path = report.sr_path
    result.preview_path = report.preview_path
    result.review_series_instance_uid = report.review_series_instance_uid
    result.review_paths = list(report.review_paths) if report.review_paths else None
    result.key_image_path = report.key_image_path


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in timings.items()}


def shadow_automatic(
    rt: WorkerRuntime,
    job_id: int,
    job_key: str,
    series: Series,
    overview: Volume,
    volume: Volume,
    proposals: Sequence[Proposal],
    live_bodies: Sequence[Body],
    live_result_id: int,
) -> None:
    """Shadow mode: the candidate on the same proposed bodies and decoded volume; its result
    (on its own most suspicious body) recorded with role shadow, its SR and overview stored,
    never delivered. Never raises (:func:`worker.shadow.run_candidate`)."""

    def run(candidate: Classifier) -> int:
        _require_automatic_model(rt, candidate)
        timings: dict[str, float] = {}
        with timed(timings, "load_bodies_s"):
            reach = rt.classifier.preprocess.lateral_reach_mm
            seen = (
                volume
                if candidate.preprocess.lateral_reach_mm <= reach
                else load_bodies(candidate, series, overview, proposals)
            )
        with timed(timings, "inference_s"):
            annotation_of = dict(
                zip((body.roi for body in live_bodies), _body_annotations(rt, job_id), strict=True)
            )
            bodies = [
                b for b in classify_bodies(candidate, seen, proposals) if b.roi in annotation_of
            ]
            if not bodies:
                raise PermanentError("the candidate kept none of the bodies the live model judged")
        with timed(timings, "report_s"):
            report = write_report(
                rt, job_key, series, overview, bodies, classifier=candidate, volume=seen
            )
        with timed(timings, "record_s"):
            result_id, _ = record_result(
                rt,
                job_id,
                overview.series_instance_uid,
                bodies,
                job_key,
                timings,
                report=report,
                classifier=candidate,
                role=SHADOW,
                annotation_ids=[annotation_of[body.roi] for body in bodies],
            )
        return result_id

    shadow.run_candidate(rt, live_result_id, f"automatic job {job_id}", run)


def _body_annotations(rt: WorkerRuntime, job_id: int) -> list[int]:
    """The annotations the live result made of the job's bodies, in the live bodies' order."""
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(RoiAnnotation.id)
                .where(RoiAnnotation.auto_job_id == job_id)
                .order_by(RoiAnnotation.id)
            )
        )


# --- end states ------------------------------------------------------------------------------


def _unanalysable(
    rt: WorkerRuntime, job_id: int, reason: str, series_uid: str | None
) -> AutomaticOutcome:
    with transaction(rt.sessions) as session:
        lifecycle.auto_job_unanalysable(
            session,
            job_id,
            worker_id=rt.worker_id,
            reason=reason,
            series_instance_uid=series_uid,
            localiser=LOCALISER,
            now=datetime.now(UTC),
        )
    log.info("automatic job %d: could not analyse: %s", job_id, reason)
    return AutomaticOutcome(Outcome.DONE, job_id, unanalysable=reason)


def _fail(rt: WorkerRuntime, job_id: int, reason: str) -> AutomaticOutcome:
    with transaction(rt.sessions) as session:
        lifecycle.fail_auto_job(
            session, job_id, worker_id=rt.worker_id, reason=reason, now=datetime.now(UTC)
        )
    log.warning("automatic job %d failed: %s", job_id, reason)
    return AutomaticOutcome(Outcome.FAILED, job_id, reason=reason)


def _retry_or_fail(rt: WorkerRuntime, job_id: int, attempt: int, reason: str) -> AutomaticOutcome:
    if attempt >= rt.settings.job_max_attempts:
        return _fail(rt, job_id, f"gave up after {attempt} attempts: {reason}")
    delay = lifecycle.backoff_s(attempt, base_s=rt.settings.delivery_backoff_s, max_s=300.0)
    try:
        with transaction(rt.sessions) as session:
            lifecycle.release_auto_job(
                session, job_id, worker_id=rt.worker_id, reason=reason, now=datetime.now(UTC)
            )
    except OperationalError:
        log.warning("automatic job %d: database unavailable; its lease will expire", job_id)
    log.warning(
        "automatic job %d: attempt %d failed (%s); retry in %.0f s", job_id, attempt, reason, delay
    )
    return AutomaticOutcome(Outcome.RETRY, job_id, reason=reason, retry_in_s=delay)
