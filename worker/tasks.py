"""Celery tasks: thin shells around the pipeline and the outbox (ids in, nothing out).

Retries are the only logic here, and they are unbounded (``max_retries=None`` on the task:
``retry(max_retries=None)`` alone would fall back to Celery's default of 3, and the fourth
retry would drop the message until the node's sweep re-sent it a minute later); the job's own
attempts and back-off decide when it fails. The database stays the source of truth: a lost
message is re-sent by the node's sweep, a duplicate one finds nothing to claim.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from celery import Task, shared_task

from dicom_node.archive import lifecycle
from dicom_node.broker.wake import AUTO_TRIAGE_TASK, DELIVER_TASK, TRIAGE_TASK
from worker.automatic import run_automatic
from worker.delivery import DeliveryOutcome, run_delivery
from worker.pipeline import Outcome, run_triage
from worker.runtime import WorkerRuntime, get_runtime

log = logging.getLogger(__name__)

# One automatic job at a time per worker process: it decodes on every core and classifies a
# batch of every body (the process peaks at about 1.35 GiB at 300 × 512 × 512, most of it
# PyTorch and the model), so a second one beside it would add memory without finishing either
# sooner. The worker's other threads still take reader-ROI jobs and deliveries; more
# throughput comes from more worker processes or hosts. A second automatic job never waits on
# a thread for the slot (the deliveries of the running one would queue behind it): it goes
# back to the broker and comes again after AUTOMATIC_SLOT_WAIT_S, or to another worker's free
# slot. Whichever message comes back first gets the slot, so the slot's holder first runs the
# older studies' jobs still waiting (oldest first, a few at most): studies are analysed in the
# order they completed, and none waits behind younger ones for as long as the queue lasts.
AUTOMATIC_SLOTS = threading.BoundedSemaphore(1)
AUTOMATIC_SLOT_WAIT_S = 0.5
AUTOMATIC_AHEAD_MAX = 8  # older jobs run before the message's own, at most


@shared_task(
    name=TRIAGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def triage_annotation(self: Task, annotation_id: int) -> str:
    result = run_triage(get_runtime(), int(annotation_id))
    if result.outcome is Outcome.RETRY and result.retry_in_s is not None:
        raise self.retry(countdown=result.retry_in_s)
    return result.outcome.value


@shared_task(
    name=AUTO_TRIAGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def triage_study(self: Task, job_id: int) -> str:
    if not AUTOMATIC_SLOTS.acquire(blocking=False):
        raise self.retry(countdown=AUTOMATIC_SLOT_WAIT_S)
    try:
        rt = get_runtime()
        run_older_first(rt, int(job_id))
        result = run_automatic(rt, int(job_id))
    finally:
        AUTOMATIC_SLOTS.release()
    if result.outcome is Outcome.RETRY and result.retry_in_s is not None:
        raise self.retry(countdown=result.retry_in_s)
    return result.outcome.value


def run_older_first(rt: WorkerRuntime, job_id: int) -> list[int]:
    """Run the automatic jobs older than ``job_id`` that are waiting and were never tried,
    oldest first (:func:`dicom_node.archive.lifecycle.oldest_waiting_auto_job`); their own
    messages then find them done. Returns the ids run."""
    ran: list[int] = []
    while len(ran) < AUTOMATIC_AHEAD_MAX:
        with rt.sessions() as session:
            older = lifecycle.oldest_waiting_auto_job(
                session, before_id=job_id, now=datetime.now(UTC), skip=ran
            )
        if older is None:
            break
        ran.append(older)
        log.info("automatic job %d waited longer than job %d: run first", older, job_id)
        run_automatic(rt, older)
    return ran


@shared_task(
    name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def deliver(self: Task, delivery_id: int) -> str:
    result = run_delivery(get_runtime(), int(delivery_id))
    if result.outcome is DeliveryOutcome.RETRY and result.retry_at is not None:
        raise self.retry(eta=result.retry_at)
    return result.outcome.value
