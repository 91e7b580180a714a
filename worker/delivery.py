"""The outbox: one delivery per (result, destination), retried until it succeeds.

A delivery is claimed in the database, sent by its destination (:mod:`worker.destinations`),
then marked delivered; a transient failure schedules the next attempt with exponential
backoff and jitter, a permanent one (or the last attempt) marks it failed, visible in the
API and the CLI, from where ``spine-triage deliveries retry`` puts it back in the queue.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import Delivery, RoiAnnotation, Study, TriageResult
from worker import audit as delivery_audit
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
        sr_path=rt.store.absolute(result.sr_path) if result.sr_path else None,
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
        review_paths=tuple(rt.store.absolute(path) for path in result.review_paths or ()),
        key_image_path=rt.store.absolute(result.key_image_path) if result.key_image_path else None,
    )


def run_delivery(rt: WorkerRuntime, delivery_id: int) -> DeliveryResult:
    """Attempt one delivery: claim → send → record the outcome."""
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        claim = lifecycle.claim_delivery(session, delivery_id, now=now, lease_s=DELIVERY_LEASE_S)
        if claim is None:
            return DeliveryResult(DeliveryOutcome.SKIPPED, delivery_id)
        payload = load_payload(session, rt, delivery_id, claim.attempt)

    name = claim.destination
    destination = rt.destinations.get(name)
    try:
        if destination is None:
            raise PermanentError(f"destination {name!r} is no longer configured")
        destination.send(payload)
    except PermanentError as exc:
        return _record_failure(rt, claim, str(exc), final=True)
    except TransientError as exc:
        return _record_failure(rt, claim, str(exc), final=claim.is_last_attempt)
    except Exception as exc:  # an unforeseen failure counts as transient, with its traceback
        log.exception("delivery %d to %s: unexpected error", delivery_id, name)
        reason = f"internal error: {type(exc).__name__}: {exc}"
        return _record_failure(rt, claim, reason, final=claim.is_last_attempt)

    with transaction(rt.sessions) as session:
        lifecycle.delivery_sent(session, delivery_id, now=datetime.now(UTC))
    delivery_audit.delivery_sent(rt, payload, name)
    log.info("delivery %d to %s done (attempt %d)", delivery_id, name, claim.attempt)
    return DeliveryResult(DeliveryOutcome.DELIVERED, delivery_id)


def _record_failure(
    rt: WorkerRuntime, claim: lifecycle.DeliveryClaim, reason: str, *, final: bool
) -> DeliveryResult:
    delivery_id = claim.delivery_id
    if final:
        retry_at = None
        log.error("delivery %d failed for good: %s", delivery_id, reason)
    else:
        delay = lifecycle.backoff_s(
            claim.attempt,
            base_s=rt.settings.delivery_backoff_s,
            max_s=rt.settings.delivery_backoff_max_s,
        )
        retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        log.warning(
            "delivery %d: attempt %d failed (%s); next in %.0f s",
            delivery_id,
            claim.attempt,
            reason,
            delay,
        )
    with transaction(rt.sessions) as session:
        lifecycle.delivery_attempt_failed(session, delivery_id, reason=reason, retry_at=retry_at)
    if retry_at is None:
        return DeliveryResult(DeliveryOutcome.FAILED, delivery_id, reason=reason)
    return DeliveryResult(DeliveryOutcome.RETRY, delivery_id, reason=reason, retry_at=retry_at)
