"""The outbox: one delivery per (result, destination), retried until it succeeds.

A delivery is claimed in the database, sent by its destination (:mod:`worker.destinations`),
then marked delivered; a transient failure schedules the next attempt with exponential
backoff and jitter, a permanent one (or the last attempt) marks it failed, visible in the
API and the CLI, from where ``spine-triage deliveries retry`` puts it back in the queue.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_node.archive.db import transaction
from dicom_node.archive.schema import Delivery, DeliveryState, RoiAnnotation, Study, TriageResult
from dicom_node.settings import DestinationSettings
from worker.claims import backoff_s, claim_delivery
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

DELIVERY_LEASE_S = 300.0


class DeliveryOutcome(enum.Enum):
    DELIVERED = "delivered"
    SKIPPED = "skipped"  # not due, or another worker is sending it
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class DeliveryResult:
    outcome: DeliveryOutcome
    delivery_id: int
    reason: str | None = None
    retry_at: datetime | None = None


def create_deliveries(
    session: Session, result_id: int, destinations: Sequence[DestinationSettings], *, now: datetime
) -> list[int]:
    """One pending delivery per destination (existing ones are kept); returns the new ids."""
    created: list[int] = []
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for destination in destinations:
        statement = (
            insert(Delivery)
            .values(
                result_id=result_id,
                destination=destination.name,
                kind=destination.kind,
                state=DeliveryState.PENDING,
                attempts=0,
                max_attempts=destination.max_attempts,
                next_attempt_at=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["result_id", "destination"])
            .returning(Delivery.id)
        )
        delivery_id = session.scalar(statement)
        if delivery_id is not None:
            created.append(delivery_id)
    return created


def load_payload(
    session: Session, rt: WorkerRuntime, delivery_id: int, attempt: int
) -> DeliveryPayload:
    row = session.execute(
        select(Delivery, TriageResult, RoiAnnotation, Study)
        .join(TriageResult, Delivery.result_id == TriageResult.id)
        .join(RoiAnnotation, TriageResult.annotation_id == RoiAnnotation.id)
        .outerjoin(Study, Study.study_instance_uid == RoiAnnotation.study_instance_uid)
        .where(Delivery.id == delivery_id)
    ).one()
    delivery, result, annotation, study = row
    return DeliveryPayload(
        delivery_id=delivery.id,
        result_id=result.id,
        attempt=attempt,
        study_instance_uid=annotation.study_instance_uid,
        accession_number=study.accession_number if study else None,
        patient_id=study.patient_id if study else None,
        patient_name=study.patient_name if study else None,
        sr_path=rt.store.absolute(result.sr_path),
        sr_sop_instance_uid=result.sr_sop_instance_uid,
        sr_series_instance_uid=result.sr_series_instance_uid,
        patient_probability=result.patient_probability,
        slice_x_mm=tuple(result.slice_x_mm),
        slice_probabilities=tuple(result.slice_probabilities),
        label=result.label,
        priority=result.priority,
        threshold=result.threshold,
        model_name=result.model_name,
        model_version=result.model_version,
        demonstration=result.demonstration_model,
        vertebra=annotation.vertebra,
        result_created_at=result.created_at,
    )


def run_delivery(rt: WorkerRuntime, delivery_id: int) -> DeliveryResult:
    """Attempt one delivery: claim → send → record the outcome."""
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        claim = claim_delivery(session, delivery_id, now=now, lease_s=DELIVERY_LEASE_S)
        if claim is None:
            return DeliveryResult(DeliveryOutcome.SKIPPED, delivery_id)
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        name, max_attempts = delivery.destination, delivery.max_attempts
        payload = load_payload(session, rt, delivery_id, claim.attempt)

    destination = rt.destinations.get(name)
    try:
        if destination is None:
            raise PermanentError(f"destination {name!r} is no longer configured")
        destination.send(payload)
    except PermanentError as exc:
        return _record_failure(rt, delivery_id, str(exc), final=True)
    except TransientError as exc:
        final = claim.attempt >= max_attempts
        return _record_failure(rt, delivery_id, str(exc), final=final, attempt=claim.attempt)
    except Exception as exc:  # an unforeseen failure counts as transient, with its traceback
        log.exception("delivery %d to %s: unexpected error", delivery_id, name)
        final = claim.attempt >= max_attempts
        reason = f"internal error: {type(exc).__name__}: {exc}"
        return _record_failure(rt, delivery_id, reason, final=final, attempt=claim.attempt)

    with transaction(rt.sessions) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(
                state=DeliveryState.DELIVERED,
                delivered_at=datetime.now(UTC),
                claimed_until=None,
                last_error=None,
            )
        )
    log.info("delivery %d to %s done (attempt %d)", delivery_id, name, claim.attempt)
    return DeliveryResult(DeliveryOutcome.DELIVERED, delivery_id)


def _record_failure(
    rt: WorkerRuntime, delivery_id: int, reason: str, *, final: bool, attempt: int = 0
) -> DeliveryResult:
    now = datetime.now(UTC)
    if final:
        values: dict[str, object] = {
            "state": DeliveryState.FAILED,
            "claimed_until": None,
            "last_error": reason[:2000],
        }
        outcome, retry_at = DeliveryOutcome.FAILED, None
        log.error("delivery %d failed for good: %s", delivery_id, reason)
    else:
        delay = backoff_s(
            attempt, base_s=rt.settings.delivery_backoff_s, max_s=rt.settings.delivery_backoff_max_s
        )
        retry_at = now + timedelta(seconds=delay)
        values = {
            "state": DeliveryState.PENDING,
            "claimed_until": None,
            "enqueued_at": None,
            "next_attempt_at": retry_at,
            "last_error": reason[:2000],
        }
        outcome = DeliveryOutcome.RETRY
        log.warning(
            "delivery %d: attempt %d failed (%s); next in %.0f s",
            delivery_id,
            attempt,
            reason,
            delay,
        )
    with transaction(rt.sessions) as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))
    return DeliveryResult(outcome, delivery_id, reason=reason, retry_at=retry_at)


def retry_failed(
    session: Session, *, delivery_ids: Sequence[int] | None, now: datetime
) -> list[int]:
    """Put failed deliveries back in the queue with a fresh set of attempts."""
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
