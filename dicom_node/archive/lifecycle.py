"""Every state of studies, annotations, automatic jobs and deliveries, and every move between
them.

This module alone writes a state column (and the leases and enqueue marks that go with the
states); the node's ingest and scheduler, the REST API, the workers and the command line call
it. Its queries are the one definition of what is *ready*, *claimable* and *due*.

Studies::

    RECEIVING ──quiet for the quiet period──▶ COMPLETE ──an instance arrives──▶ RECEIVING

Annotations (the unit of triage work)::

    PENDING ──claim (study complete)──▶ PROCESSING ──result recorded──▶ DONE
       ▲                                   │  transient failure: released
       └───────────────────────────────────┘  lease expired: another worker takes it over
    PROCESSING ──permanent failure, or attempts exhausted──▶ FAILED ──retry by hand──▶ PENDING

Automatic jobs (one per study; created by the site policy ``AUTO_ROI`` when a study is
complete)::

    PENDING ──claim (study complete)──▶ PROCESSING ──result, then its report recorded──▶ DONE
    PROCESSING ──nothing analysable (no spine in view, …)──▶ UNANALYSABLE (reason kept)
    PROCESSING ──transient failure──▶ PENDING; permanent failure or attempts exhausted──▶ FAILED

  An automatic job's bodies become annotations (source ``auto``) in the transaction that
  records its result: they are born DONE and are never claimed on their own. The result (and
  its flag deliveries) is committed while the job is processing; the report follows, and
  ``complete_auto_job`` ends the job with it. A job whose worker died between the two is
  claimed again when its lease expires and finds its result recorded.

Deliveries (the outbox)::

    PENDING ──due, claim──▶ SENDING ──sent──▶ DELIVERED
    SENDING ──transient failure──▶ PENDING (next attempt after a backoff)
    SENDING ──permanent failure, or last attempt──▶ FAILED ──retry by hand──▶ PENDING

A claim is a row lock (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises
writers with ``BEGIN IMMEDIATE``) followed by a conditional update, and it holds a lease. A
broker message only wakes a worker: work that needs a message carries ``enqueued_at`` once
one was sent, so the scheduler knows what to send again when a message is lost.

Every function runs in the caller's transaction (a ``Session`` or, on the ingest hot path, a
``Connection``) and commits nothing itself.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Integer, Select, Table, and_, bindparam, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from dicom_node.archive.db import DriverStatement, insert_ignore
from dicom_node.archive.schema import (
    AnnotationState,
    AutoJob,
    AutoJobState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    Study,
    StudyState,
)
from dicom_node.settings import AutoRoiPolicy, DestinationSettings
from model.serving.roi import Roi

log = logging.getLogger(__name__)

_STUDY = cast(Table, Study.__table__)


_Query = TypeVar("_Query", bound="Select[*tuple[Any, ...]]")


def _lock_rows(session: Session, query: _Query, **options: Any) -> _Query:
    """Lock the selected rows, skipping those another transaction holds (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True, **options)
    return query


def _needs_message(enqueued_at: Any, now: datetime, stale_after_s: float | None) -> Any:
    """Never sent a message; or, with ``stale_after_s``, sent one that long ago (lost?)."""
    if stale_after_s is None:
        return enqueued_at.is_(None)
    return or_(enqueued_at.is_(None), enqueued_at <= now - timedelta(seconds=stale_after_s))


def backoff_s(
    attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with jitter: a random delay in [½, 1] × min(max, base·2^(n−1))."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def _claim_leased(
    session: Session,
    model: type[RoiAnnotation] | type[AutoJob],
    row_id: int,
    ready: ColumnElement[bool],
    processing: AnnotationState | AutoJobState,
    *,
    worker_id: str,
    now: datetime,
    lease_s: float,
) -> int | None:
    """Claim one row of leased work (an annotation or an automatic job) when ``ready``:
    row lock, then processing by ``worker_id`` with a lease; returns the attempt number, or
    None when it is not claimable now."""
    query = _lock_rows(
        session,
        select(model.id, model.attempts).where(model.id == row_id, ready),
        of=model,
    )
    row = session.execute(query).one_or_none()
    if row is None:
        return None
    attempt = int(row.attempts) + 1
    session.execute(
        update(model)
        .where(model.id == row_id)
        .values(
            state=processing,
            claimed_by=worker_id,
            claimed_until=now + timedelta(seconds=lease_s),
            attempts=attempt,
            updated_at=now,
        )
    )
    return attempt


# --- studies --------------------------------------------------------------------------------


class _StudyStatements:
    """The ingest path's study statements, built once per dialect (parameters vary per call)."""

    def __init__(self, dialect: str) -> None:
        self.insert = insert_ignore(dialect, _STUDY, "study_instance_uid")
        self.received = DriverStatement(  # once per instance: past SQLAlchemy's execute
            update(_STUDY)
            .where(_STUDY.c.id == bindparam("study_id"))
            .values(
                last_received_at=bindparam("now", type_=_STUDY.c.last_received_at.type),
                state=bindparam("state", type_=_STUDY.c.state.type),
                instance_count=_STUDY.c.instance_count + bindparam("added", type_=Integer()),
            )
        )


_STUDY_STATEMENTS: dict[str, _StudyStatements] = {}


def _study_statements(connection: Connection) -> _StudyStatements:
    dialect = connection.dialect.name
    statements = _STUDY_STATEMENTS.get(dialect)
    if statements is None:
        statements = _STUDY_STATEMENTS[dialect] = _StudyStatements(dialect)
    return statements


def open_study(
    connection: Connection,
    study_instance_uid: str,
    fields: dict[str, Any],
    *,
    now: datetime,
) -> None:
    """A study row for a first instance, receiving (nothing happens when it exists)."""
    connection.execute(
        _study_statements(connection).insert,
        {
            "study_instance_uid": study_instance_uid,
            **fields,
            "state": StudyState.RECEIVING,
            "instance_count": 0,
            "first_received_at": now,
            "last_received_at": now,
            "completion_count": 0,
        },
    )


def instance_received(connection: Connection, study_id: int, *, now: datetime, new: bool) -> None:
    """An instance of the study arrived: it is receiving again (completion is a quiet period
    after the last arrival); ``new`` instances are counted."""
    _study_statements(connection).received.execute(
        connection,
        {"study_id": study_id, "now": now, "state": StudyState.RECEIVING, "added": int(new)},
    )


def complete_quiet_studies(session: Session, *, quiet_period_s: float, now: datetime) -> list[str]:
    """Every study quiet for ``quiet_period_s`` becomes complete; returns their UIDs."""
    cutoff = now - timedelta(seconds=quiet_period_s)
    query = _lock_rows(
        session,
        select(Study.id, Study.study_instance_uid).where(
            Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
        ),
    )
    rows = session.execute(query).all()
    if rows:
        _complete(session, [row.id for row in rows], now)
    return [row.study_instance_uid for row in rows]


def complete_retrieved_study(session: Session, study_instance_uid: str, *, now: datetime) -> None:
    """A study retrieved whole from the PACS is complete by construction."""
    ids = list(
        session.scalars(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
    )
    if ids:
        _complete(session, ids, now)


def _complete(session: Session, study_ids: list[int], now: datetime) -> None:
    session.execute(
        update(Study)
        .where(Study.id.in_(study_ids), Study.state == StudyState.RECEIVING)
        .values(
            state=StudyState.COMPLETE,
            completed_at=now,
            completion_count=Study.completion_count + 1,
        )
    )


def _study_complete() -> ColumnElement[bool]:
    """The annotation's study is complete."""
    return (
        select(Study.id)
        .where(
            Study.study_instance_uid == RoiAnnotation.study_instance_uid,
            Study.state == StudyState.COMPLETE,
        )
        .exists()
    )


def _study_unreceived() -> ColumnElement[bool]:
    """The node holds no study of the annotation's (a worker retrieves it by WADO-RS)."""
    return (
        ~select(Study.id)
        .where(Study.study_instance_uid == RoiAnnotation.study_instance_uid)
        .exists()
    )


def study_is_complete(session: Session, study_instance_uid: str) -> bool:
    state = session.scalar(
        select(Study.state).where(Study.study_instance_uid == study_instance_uid)
    )
    return state is StudyState.COMPLETE


# --- annotations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredAnnotation:
    id: int
    created: bool  # False: the same source object was already stored (idempotent re-send)


@dataclass(frozen=True)
class Claim:
    annotation_id: int
    attempt: int


def create_annotation(
    session: Session,
    roi: Roi,
    *,
    source: str,
    now: datetime,
    source_key: str | None = None,
    annotator: str | None = None,
) -> StoredAnnotation:
    """A pending annotation for ``roi``; a ``source_key`` seen before returns the stored one."""
    if source_key is not None:
        existing = session.scalar(
            select(RoiAnnotation.id).where(RoiAnnotation.source_key == source_key)
        )
        if existing is not None:
            return StoredAnnotation(existing, created=False)
    annotation = RoiAnnotation(
        study_instance_uid=roi.study_instance_uid,
        series_instance_uid=roi.series_instance_uid,
        slices_x_mm=list(roi.slices_x_mm),
        polygon_yz_mm=[list(point) for point in roi.polygon_yz_mm],
        vertebra=roi.vertebra,
        annotator=annotator,
        source=source,
        source_key=source_key,
        state=AnnotationState.PENDING,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(annotation)
    session.flush()
    log.info(
        "annotation %d stored (%s) for study %s", annotation.id, source, roi.study_instance_uid
    )
    return StoredAnnotation(annotation.id, created=True)


def _annotation_claimable(now: datetime) -> ColumnElement[bool]:
    """Pending, or processing by a worker whose lease expired."""
    return or_(
        RoiAnnotation.state == AnnotationState.PENDING,
        and_(
            RoiAnnotation.state == AnnotationState.PROCESSING,
            RoiAnnotation.claimed_until <= now,
        ),
    )


def _annotation_ready(now: datetime, *, include_unreceived: bool) -> ColumnElement[bool]:
    """Claimable, and its study complete (or, with ``include_unreceived``, never received:
    a DICOMweb source is configured, from which the worker retrieves it)."""
    study = _study_complete()
    if include_unreceived:
        study = or_(study, _study_unreceived())
    return and_(_annotation_claimable(now), study)


def ready_annotation_ids(
    session: Session,
    *,
    now: datetime,
    stale_after_s: float | None,
    study_uids: Sequence[str] | None = None,
    include_unreceived: bool = False,
    limit: int = 500,
) -> list[int]:
    """Annotations a worker may claim now that need a (new) message.

    ``stale_after_s=None`` selects only those never enqueued; otherwise also those enqueued
    longer ago than that (their message may be lost).
    """
    query = (
        select(RoiAnnotation.id)
        .where(
            _annotation_ready(now, include_unreceived=include_unreceived),
            _needs_message(RoiAnnotation.enqueued_at, now, stale_after_s),
        )
        .order_by(RoiAnnotation.id)
        .limit(limit)
    )
    if study_uids is not None:
        query = query.where(RoiAnnotation.study_instance_uid.in_(list(study_uids)))
    return list(session.scalars(query))


def mark_annotations_enqueued(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(
            update(RoiAnnotation).where(RoiAnnotation.id.in_(list(ids))).values(enqueued_at=now)
        )


def clear_annotation_marks(session: Session, ids: Sequence[int]) -> None:
    """Their message could not be sent: the next tick sends one."""
    if ids:
        session.execute(
            update(RoiAnnotation).where(RoiAnnotation.id.in_(list(ids))).values(enqueued_at=None)
        )


def claim_annotation(
    session: Session,
    annotation_id: int,
    *,
    worker_id: str,
    now: datetime,
    lease_s: float,
    allow_unreceived: bool = False,
) -> Claim | None:
    """Claim ``annotation_id`` for ``worker_id``; None when it is not claimable now (done,
    failed, claimed by a live worker, or its study is not complete)."""
    attempt = _claim_leased(
        session,
        RoiAnnotation,
        annotation_id,
        _annotation_ready(now, include_unreceived=allow_unreceived),
        AnnotationState.PROCESSING,
        worker_id=worker_id,
        now=now,
        lease_s=lease_s,
    )
    if attempt is None:
        return None
    return Claim(annotation_id, attempt)


def holds_claim(session: Session, annotation_id: int, worker_id: str) -> bool:
    """Whether ``worker_id`` still owns the claim (its lease was not taken over)."""
    owner = session.scalar(
        select(RoiAnnotation.claimed_by).where(
            RoiAnnotation.id == annotation_id,
            RoiAnnotation.state == AnnotationState.PROCESSING,
        )
    )
    return owner == worker_id


def complete_annotation(session: Session, annotation_id: int, *, now: datetime) -> None:
    """Its result is recorded (in the same transaction)."""
    session.execute(
        update(RoiAnnotation)
        .where(RoiAnnotation.id == annotation_id)
        .values(
            state=AnnotationState.DONE,
            claimed_by=None,
            claimed_until=None,
            failure_reason=None,
            updated_at=now,
        )
    )


def release_annotation(
    session: Session, annotation_id: int, *, worker_id: str, reason: str, now: datetime
) -> None:
    """Back to pending after a transient failure (the retry message wakes a worker)."""
    session.execute(
        update(RoiAnnotation)
        .where(RoiAnnotation.id == annotation_id, RoiAnnotation.claimed_by == worker_id)
        .values(
            state=AnnotationState.PENDING,
            claimed_by=None,
            claimed_until=None,
            enqueued_at=now,
            failure_reason=reason,
            updated_at=now,
        )
    )


def fail_annotation(
    session: Session, annotation_id: int, *, worker_id: str | None, reason: str, now: datetime
) -> None:
    """Failed for good, with its reason (visible in the API and the CLI); ``worker_id``: only
    while that worker holds the claim."""
    conditions = [RoiAnnotation.id == annotation_id]
    if worker_id is not None:
        conditions.append(RoiAnnotation.claimed_by == worker_id)
    session.execute(
        update(RoiAnnotation)
        .where(*conditions)
        .values(
            state=AnnotationState.FAILED,
            claimed_by=None,
            claimed_until=None,
            failure_reason=reason,
            updated_at=now,
        )
    )


def retry_failed_annotations(
    session: Session, annotation_ids: Sequence[int] | None, *, now: datetime
) -> list[int]:
    """Failed annotations (all, or those named) back to pending with a fresh set of attempts,
    after the cause was fixed (e.g. a missing series re-sent); the scheduler wakes a worker."""
    query = select(RoiAnnotation.id).where(RoiAnnotation.state == AnnotationState.FAILED)
    if annotation_ids:
        query = query.where(RoiAnnotation.id.in_(list(annotation_ids)))
    ids = list(session.scalars(query))
    if ids:
        session.execute(
            update(RoiAnnotation)
            .where(RoiAnnotation.id.in_(ids))
            .values(
                state=AnnotationState.PENDING,
                attempts=0,
                enqueued_at=None,
                claimed_by=None,
                claimed_until=None,
                updated_at=now,
            )
        )
    return ids


# --- automatic jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoClaim:
    job_id: int
    attempt: int


@dataclass(frozen=True)
class ProposedBody:
    """A body the localiser proposed, as it becomes an annotation of the automatic job."""

    roi: Roi
    confidence: float


def _reader_annotation_of_study() -> ColumnElement[bool]:
    return (
        select(RoiAnnotation.id)
        .where(
            RoiAnnotation.study_instance_uid == Study.study_instance_uid,
            RoiAnnotation.auto_job_id.is_(None),
        )
        .exists()
    )


def create_auto_jobs(
    session: Session,
    *,
    policy: AutoRoiPolicy,
    fallback_s: float,
    now: datetime,
    limit: int = 500,
) -> list[int]:
    """Pending automatic jobs for the complete studies the site policy says to analyse:
    ``always`` every complete study; ``fallback`` those complete for ``fallback_s`` without a
    reader's ROI; ``off`` none. One job per study, ever: returns the ids of those created."""
    if policy == "off":
        return []
    has_job = (
        select(AutoJob.id).where(AutoJob.study_instance_uid == Study.study_instance_uid).exists()
    )
    query = select(Study.study_instance_uid).where(Study.state == StudyState.COMPLETE, ~has_job)
    if policy == "fallback":
        query = query.where(
            Study.completed_at <= now - timedelta(seconds=fallback_s),
            ~_reader_annotation_of_study(),
        )
    uids = list(session.scalars(query.order_by(Study.completed_at).limit(limit)))
    if not uids:
        return []
    statement = insert_ignore(
        session.get_bind().dialect.name,
        cast(Table, AutoJob.__table__),
        "study_instance_uid",
    ).returning(AutoJob.id)
    created = []
    for uid in uids:
        job_id = session.scalar(
            statement,
            {
                "study_instance_uid": uid,
                "state": AutoJobState.PENDING,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
        if job_id is not None:
            created.append(job_id)
            log.info("automatic job %d created for study %s (%s)", job_id, uid, policy)
    return created


def _auto_job_ready(now: datetime) -> ColumnElement[bool]:
    """Pending (or processing with an expired lease), and its study complete."""
    claimable = or_(
        AutoJob.state == AutoJobState.PENDING,
        and_(AutoJob.state == AutoJobState.PROCESSING, AutoJob.claimed_until <= now),
    )
    complete = (
        select(Study.id)
        .where(
            Study.study_instance_uid == AutoJob.study_instance_uid,
            Study.state == StudyState.COMPLETE,
        )
        .exists()
    )
    return and_(claimable, complete)


def ready_auto_job_ids(
    session: Session, *, now: datetime, stale_after_s: float | None, limit: int = 500
) -> list[int]:
    """Automatic jobs a worker may claim now that need a (new) message."""
    query = (
        select(AutoJob.id)
        .where(_auto_job_ready(now), _needs_message(AutoJob.enqueued_at, now, stale_after_s))
        .order_by(AutoJob.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def oldest_waiting_auto_job(
    session: Session, *, before_id: int, now: datetime, skip: Collection[int] = ()
) -> int | None:
    """The oldest automatic job older than ``before_id`` that is ready and has never been
    tried (a job that failed before waits for its own retry and back-off), or None: what a
    worker whose automatic slot came free runs first, so that studies are analysed in the
    order they completed, not in the order their messages happened to come back."""
    query = (
        select(AutoJob.id)
        .where(
            _auto_job_ready(now),
            AutoJob.state == AutoJobState.PENDING,
            AutoJob.attempts == 0,
            AutoJob.id < before_id,
        )
        .order_by(AutoJob.id)
        .limit(1)
    )
    if skip:
        query = query.where(AutoJob.id.not_in(list(skip)))
    return session.scalar(query)


def mark_auto_jobs_enqueued(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(update(AutoJob).where(AutoJob.id.in_(list(ids))).values(enqueued_at=now))


def clear_auto_job_marks(session: Session, ids: Sequence[int]) -> None:
    """Their message could not be sent: the next tick sends one."""
    if ids:
        session.execute(update(AutoJob).where(AutoJob.id.in_(list(ids))).values(enqueued_at=None))


def claim_auto_job(
    session: Session, job_id: int, *, worker_id: str, now: datetime, lease_s: float
) -> AutoClaim | None:
    """Claim automatic job ``job_id``; None when it is not claimable now."""
    attempt = _claim_leased(
        session,
        AutoJob,
        job_id,
        _auto_job_ready(now),
        AutoJobState.PROCESSING,
        worker_id=worker_id,
        now=now,
        lease_s=lease_s,
    )
    if attempt is None:
        return None
    return AutoClaim(job_id, attempt)


def holds_auto_job(session: Session, job_id: int, worker_id: str) -> bool:
    owner = session.scalar(
        select(AutoJob.claimed_by).where(
            AutoJob.id == job_id, AutoJob.state == AutoJobState.PROCESSING
        )
    )
    return owner == worker_id


def _end_auto_job(
    session: Session, job_id: int, now: datetime, worker_id: str | None, **values: Any
) -> None:
    conditions = [AutoJob.id == job_id]
    if worker_id is not None:
        conditions.append(AutoJob.claimed_by == worker_id)
    session.execute(
        update(AutoJob)
        .where(*conditions)
        .values(claimed_by=None, claimed_until=None, updated_at=now, **values)
    )


def propose_bodies(
    session: Session,
    job_id: int,
    bodies: Sequence[ProposedBody],
    *,
    annotator: str,
    now: datetime,
) -> list[int]:
    """The job's bodies as annotations (source ``auto``, born DONE: the job judged them);
    returns their ids in the order given. Called again for the same job, returns the ones
    stored the first time."""
    existing = list(
        session.scalars(
            select(RoiAnnotation.id)
            .where(RoiAnnotation.auto_job_id == job_id)
            .order_by(RoiAnnotation.id)
        )
    )
    if existing:
        return existing
    annotations = [
        RoiAnnotation(
            study_instance_uid=body.roi.study_instance_uid,
            series_instance_uid=body.roi.series_instance_uid,
            slices_x_mm=list(body.roi.slices_x_mm),
            polygon_yz_mm=[list(point) for point in body.roi.polygon_yz_mm],
            vertebra=body.roi.vertebra,
            annotator=annotator,
            source="auto",
            state=AnnotationState.DONE,
            attempts=0,
            auto_job_id=job_id,
            confidence=body.confidence,
            created_at=now,
            updated_at=now,
        )
        for body in bodies
    ]
    session.add_all(annotations)
    session.flush()
    return [annotation.id for annotation in annotations]


def complete_auto_job(
    session: Session, job_id: int, *, series_instance_uid: str, localiser: str, now: datetime
) -> None:
    """Every body classified, the result and its report recorded."""
    _end_auto_job(
        session,
        job_id,
        now,
        None,
        state=AutoJobState.DONE,
        series_instance_uid=series_instance_uid,
        localiser=localiser,
        failure_reason=None,
    )


def auto_job_unanalysable(
    session: Session,
    job_id: int,
    *,
    worker_id: str,
    reason: str,
    series_instance_uid: str | None,
    localiser: str,
    now: datetime,
) -> None:
    """Nothing could be analysed (said, never guessed): the study shows the reason."""
    _end_auto_job(
        session,
        job_id,
        now,
        worker_id,
        state=AutoJobState.UNANALYSABLE,
        unanalysable_reason=reason[:2000],
        series_instance_uid=series_instance_uid,
        localiser=localiser,
        failure_reason=None,
    )


def release_auto_job(
    session: Session, job_id: int, *, worker_id: str, reason: str, now: datetime
) -> None:
    """Back to pending after a transient failure (the retry message wakes a worker)."""
    _end_auto_job(
        session,
        job_id,
        now,
        worker_id,
        state=AutoJobState.PENDING,
        enqueued_at=now,
        failure_reason=reason,
    )


def fail_auto_job(
    session: Session, job_id: int, *, worker_id: str | None, reason: str, now: datetime
) -> None:
    _end_auto_job(session, job_id, now, worker_id, state=AutoJobState.FAILED, failure_reason=reason)


# --- deliveries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: int
    attempt: int
    destination: str
    max_attempts: int

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


def create_deliveries(
    session: Session,
    result_id: int,
    destinations: Sequence[DestinationSettings],
    *,
    now: datetime,
) -> list[int]:
    """One pending delivery per destination, due now (existing ones are kept); returns the
    ids of those created."""
    statement = insert_ignore(
        session.get_bind().dialect.name,
        cast(Table, Delivery.__table__),
        ["result_id", "destination"],
    ).returning(Delivery.id)
    created: list[int] = []
    for destination in destinations:
        delivery_id = session.scalar(
            statement,
            {
                "result_id": result_id,
                "destination": destination.name,
                "kind": destination.kind,
                "state": DeliveryState.PENDING,
                "attempts": 0,
                "max_attempts": destination.max_attempts,
                "next_attempt_at": now,
                "created_at": now,
            },
        )
        if delivery_id is not None:
            created.append(delivery_id)
    return created


def _delivery_due(now: datetime) -> ColumnElement[bool]:
    """Pending with its next attempt reached, or sending by a worker whose lease expired."""
    return or_(
        and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
        and_(Delivery.state == DeliveryState.SENDING, Delivery.claimed_until <= now),
    )


def due_delivery_ids(
    session: Session, *, now: datetime, stale_after_s: float, limit: int = 500
) -> list[int]:
    """Deliveries due for an attempt that need a (new) message (none sent, or one sent
    longer than ``stale_after_s`` ago)."""
    query = (
        select(Delivery.id)
        .where(_delivery_due(now), _needs_message(Delivery.enqueued_at, now, stale_after_s))
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_deliveries_enqueued(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(list(ids))).values(enqueued_at=now))


def clear_delivery_marks(session: Session, ids: Sequence[int]) -> None:
    """Their message could not be sent: the next tick sends one."""
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(list(ids))).values(enqueued_at=None))


def claim_delivery(
    session: Session, delivery_id: int, *, now: datetime, lease_s: float
) -> DeliveryClaim | None:
    """Claim a due delivery; None when it is not due or another worker is sending it."""
    query = _lock_rows(
        session,
        select(Delivery.id, Delivery.attempts, Delivery.destination, Delivery.max_attempts).where(
            Delivery.id == delivery_id, _delivery_due(now)
        ),
    )
    row = session.execute(query).one_or_none()
    if row is None:
        return None
    attempt = row.attempts + 1
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id)
        .values(
            state=DeliveryState.SENDING,
            claimed_until=now + timedelta(seconds=lease_s),
            attempts=attempt,
        )
    )
    return DeliveryClaim(delivery_id, attempt, row.destination, row.max_attempts)


def delivery_sent(session: Session, delivery_id: int, *, now: datetime) -> None:
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id)
        .values(
            state=DeliveryState.DELIVERED, delivered_at=now, claimed_until=None, last_error=None
        )
    )


def delivery_attempt_failed(
    session: Session, delivery_id: int, *, reason: str, retry_at: datetime | None
) -> None:
    """The attempt failed: pending again until ``retry_at``, or failed for good (``None``)."""
    values: dict[str, Any] = {"claimed_until": None, "last_error": reason[:2000]}
    if retry_at is None:
        values["state"] = DeliveryState.FAILED
    else:
        values |= {"state": DeliveryState.PENDING, "enqueued_at": None, "next_attempt_at": retry_at}
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


def retry_failed_deliveries(
    session: Session, delivery_ids: Sequence[int] | None, *, now: datetime
) -> list[int]:
    """Failed deliveries (all, or those named) back in the queue with a fresh set of attempts."""
    query = select(Delivery.id).where(Delivery.state == DeliveryState.FAILED)
    if delivery_ids:
        query = query.where(Delivery.id.in_(list(delivery_ids)))
    ids = list(session.scalars(query))
    if ids:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                enqueued_at=None,
                claimed_until=None,
            )
        )
    return ids
