"""When work becomes ready, and how the node wakes the workers (by task *name*).

The database is the source of truth; a broker message only wakes a worker. A job is ready
when its study is complete and its annotation pending (or its worker's lease expired). A
message may be lost (a broker restarted without persistence, a worker killed): the sweep
re-sends it after ``stale_after``; a duplicate message is harmless because a worker must
claim the annotation in the database before it works on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    Study,
    StudyState,
)

log = logging.getLogger(__name__)

# Celery task names: the node sends by name, so it never imports the worker.
TRIAGE_TASK = "spine_triage.triage_annotation"
DELIVER_TASK = "spine_triage.deliver"
TRIAGE_QUEUE = "triage"
DELIVERY_QUEUE = "delivery"

SendTask = Callable[[str, Sequence[int], str], None]
"""``send(task_name, args, queue)``: publishes one message (ids only)."""


@dataclass(frozen=True)
class SweepReport:
    studies_completed: tuple[str, ...]
    triage_enqueued: tuple[int, ...]
    deliveries_enqueued: tuple[int, ...]


def _skip_locked(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def complete_quiet_studies(session: Session, *, quiet_period_s: float, now: datetime) -> list[str]:
    """Mark complete every study quiet for ``quiet_period_s``; returns their UIDs."""
    cutoff = now - timedelta(seconds=quiet_period_s)
    query = select(Study.id, Study.study_instance_uid).where(
        Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
    )
    if _skip_locked(session):
        query = query.with_for_update(skip_locked=True)
    rows = session.execute(query).all()
    if not rows:
        return []
    session.execute(
        update(Study)
        .where(Study.id.in_([row.id for row in rows]), Study.state == StudyState.RECEIVING)
        .values(
            state=StudyState.COMPLETE,
            completed_at=now,
            completion_count=Study.completion_count + 1,
        )
    )
    return [row.study_instance_uid for row in rows]


def ready_annotation_ids(
    session: Session,
    *,
    now: datetime,
    stale_after_s: float | None,
    study_uids: Sequence[str] | None = None,
    include_unreceived: bool = False,
    limit: int = 500,
) -> list[int]:
    """Annotations a worker may take now and that need a (new) message.

    ``include_unreceived``: also annotations of studies the node never received (a DICOMweb
    source is configured, from which the worker retrieves them).

    ``stale_after_s=None`` selects only those never enqueued; otherwise also those enqueued
    longer ago than that (their message may be lost) and those whose worker's lease expired.
    """
    pending = RoiAnnotation.state == AnnotationState.PENDING
    if stale_after_s is None:
        needs_message = and_(pending, RoiAnnotation.enqueued_at.is_(None))
    else:
        stale = now - timedelta(seconds=stale_after_s)
        needs_message = or_(
            and_(
                pending,
                or_(RoiAnnotation.enqueued_at.is_(None), RoiAnnotation.enqueued_at <= stale),
            ),
            and_(
                RoiAnnotation.state == AnnotationState.PROCESSING,
                RoiAnnotation.claimed_until <= now,
                or_(RoiAnnotation.enqueued_at.is_(None), RoiAnnotation.enqueued_at <= stale),
            ),
        )
    study_ready = Study.state == StudyState.COMPLETE
    if include_unreceived:  # the worker retrieves the study from the PACS (WADO-RS)
        study_ready = or_(study_ready, Study.id.is_(None))
    query = (
        select(RoiAnnotation.id)
        .outerjoin(Study, Study.study_instance_uid == RoiAnnotation.study_instance_uid)
        .where(study_ready, needs_message)
        .order_by(RoiAnnotation.id)
        .limit(limit)
    )
    if study_uids is not None:
        query = query.where(RoiAnnotation.study_instance_uid.in_(list(study_uids)))
    return list(session.scalars(query))


def due_delivery_ids(
    session: Session, *, now: datetime, stale_after_s: float, limit: int = 500
) -> list[int]:
    """Deliveries due for an attempt that need a (new) message.

    Due: pending with ``next_attempt_at`` reached, or sending with the sender's lease
    expired. A message already sent less than ``stale_after_s`` ago is not sent again.
    """
    stale = now - timedelta(seconds=stale_after_s)
    query = (
        select(Delivery.id)
        .where(
            or_(
                and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
                and_(Delivery.state == DeliveryState.SENDING, Delivery.claimed_until <= now),
            ),
            or_(Delivery.enqueued_at.is_(None), Delivery.enqueued_at <= stale),
        )
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_deliveries_enqueued(session: Session, delivery_ids: Sequence[int], now: datetime) -> None:
    if delivery_ids:
        session.execute(
            update(Delivery).where(Delivery.id.in_(list(delivery_ids))).values(enqueued_at=now)
        )


def mark_enqueued(session: Session, annotation_ids: Sequence[int], now: datetime) -> None:
    if annotation_ids:
        session.execute(
            update(RoiAnnotation)
            .where(RoiAnnotation.id.in_(list(annotation_ids)))
            .values(enqueued_at=now)
        )


def publish(send: SendTask, task_name: str, ids: Sequence[int], queue: str) -> list[int]:
    """Send one message per id; returns the ids that were sent.

    A broker that is down is not an error here: the work stays ready in the database and
    the next sweep sends it again.
    """
    sent: list[int] = []
    for job_id in ids:
        try:
            send(task_name, [job_id], queue)
        except Exception as exc:  # any broker failure: the sweep sends it again
            log.warning(
                "broker unavailable, %s for id %d left to the next sweep: %s",
                task_name,
                job_id,
                type(exc).__name__,
            )
            break
        sent.append(job_id)
    return sent
