"""Claiming work in the database: a row lock and a lease.

Two workers never run the same annotation: the claim is a row lock (``SELECT … FOR UPDATE
SKIP LOCKED`` on PostgreSQL; SQLite serialises writers with ``BEGIN IMMEDIATE``) followed by
a conditional update, and it holds a lease. A worker that dies leaves its lease to expire;
then another worker may take the annotation over.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    Study,
    StudyState,
)


@dataclass(frozen=True)
class Claim:
    annotation_id: int
    attempt: int


def _lockable(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def claim_annotation(
    session: Session,
    annotation_id: int,
    *,
    worker_id: str,
    now: datetime,
    lease_s: float,
    allow_unreceived: bool = False,
) -> Claim | None:
    """Claim ``annotation_id`` for ``worker_id``; None when it is not claimable now
    (done, failed, claimed by a live worker, or its study is not complete). With
    ``allow_unreceived``, an annotation of a study the node never received is claimable
    too (the worker retrieves the study)."""
    claimable = or_(
        RoiAnnotation.state == AnnotationState.PENDING,
        and_(
            RoiAnnotation.state == AnnotationState.PROCESSING,
            RoiAnnotation.claimed_until <= now,
        ),
    )
    study_complete: ColumnElement[bool] = (
        select(Study.id)
        .where(
            Study.study_instance_uid == RoiAnnotation.study_instance_uid,
            Study.state == StudyState.COMPLETE,
        )
        .exists()
    )
    if allow_unreceived:
        study_complete = or_(
            study_complete,
            ~select(Study.id)
            .where(Study.study_instance_uid == RoiAnnotation.study_instance_uid)
            .exists(),
        )
    query = select(RoiAnnotation.id, RoiAnnotation.attempts).where(
        RoiAnnotation.id == annotation_id, claimable, study_complete
    )
    if _lockable(session):
        query = query.with_for_update(skip_locked=True, of=RoiAnnotation)
    row = session.execute(query).one_or_none()
    if row is None:
        return None
    attempt = row.attempts + 1
    session.execute(
        update(RoiAnnotation)
        .where(RoiAnnotation.id == annotation_id)
        .values(
            state=AnnotationState.PROCESSING,
            claimed_by=worker_id,
            claimed_until=now + timedelta(seconds=lease_s),
            attempts=attempt,
            updated_at=now,
        )
    )
    return Claim(annotation_id, attempt)


def still_holds(session: Session, annotation_id: int, worker_id: str) -> bool:
    """Whether ``worker_id`` still owns the claim (its lease was not taken over)."""
    owner = session.scalar(
        select(RoiAnnotation.claimed_by).where(
            RoiAnnotation.id == annotation_id,
            RoiAnnotation.state == AnnotationState.PROCESSING,
        )
    )
    return owner == worker_id


def release_for_retry(
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
    """Failed for good, with its reason (visible in the API and the CLI)."""
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
    session: Session, annotation_ids: list[int] | None, *, now: datetime
) -> list[int]:
    """Failed annotations back to pending with a fresh set of attempts (after the cause was
    fixed, e.g. a missing series re-sent); the node's scheduler wakes a worker for them."""
    query = select(RoiAnnotation.id).where(RoiAnnotation.state == AnnotationState.FAILED)
    if annotation_ids:
        query = query.where(RoiAnnotation.id.in_(annotation_ids))
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


def backoff_s(
    attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with jitter: a random delay in [½, 1] × min(max, base·2^(n−1))."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


# --- deliveries --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: int
    attempt: int


def claim_delivery(
    session: Session, delivery_id: int, *, now: datetime, lease_s: float
) -> DeliveryClaim | None:
    """Claim a due delivery; None when it is not due or another worker is sending it."""
    due = or_(
        and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
        and_(Delivery.state == DeliveryState.SENDING, Delivery.claimed_until <= now),
    )
    query = select(Delivery.id, Delivery.attempts).where(Delivery.id == delivery_id, due)
    if _lockable(session):
        query = query.with_for_update(skip_locked=True)
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
    return DeliveryClaim(delivery_id, attempt)
