"""Celery tasks: thin shells around the pipeline and the outbox (ids in, nothing out).

Retries are the only logic here. The database stays the source of truth: a lost message
is re-sent by the node's sweep, a duplicate one finds nothing to claim.
"""

from __future__ import annotations

import logging
import threading

from celery import Task, shared_task

from dicom_node.broker.wake import AUTO_TRIAGE_TASK, DELIVER_TASK, TRIAGE_TASK
from worker.automatic import run_automatic
from worker.delivery import DeliveryOutcome, run_delivery
from worker.pipeline import Outcome, run_triage
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

# One automatic job at a time per worker process: it holds a whole series in memory (about
# 1.4 GiB of the process at 300 × 512 × 512) and decodes on every core, so a second one beside
# it would double the worker's memory without finishing either sooner. The worker's other
# threads still take reader-ROI jobs and deliveries; more throughput comes from more worker
# processes or hosts. A second automatic job never waits on a thread for the slot (the
# deliveries of the running one would queue behind it): it goes back to the broker and comes
# again after AUTOMATIC_SLOT_WAIT_S, or to another worker's free slot.
AUTOMATIC_SLOTS = threading.BoundedSemaphore(1)
AUTOMATIC_SLOT_WAIT_S = 0.5


@shared_task(name=TRIAGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def triage_annotation(self: Task, annotation_id: int) -> str:
    result = run_triage(get_runtime(), int(annotation_id))
    if result.outcome is Outcome.RETRY and result.retry_in_s is not None:
        raise self.retry(countdown=result.retry_in_s, max_retries=None)
    return result.outcome.value


@shared_task(name=AUTO_TRIAGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def triage_study(self: Task, job_id: int) -> str:
    if not AUTOMATIC_SLOTS.acquire(blocking=False):
        raise self.retry(countdown=AUTOMATIC_SLOT_WAIT_S, max_retries=None)
    try:
        result = run_automatic(get_runtime(), int(job_id))
    finally:
        AUTOMATIC_SLOTS.release()
    if result.outcome is Outcome.RETRY and result.retry_in_s is not None:
        raise self.retry(countdown=result.retry_in_s, max_retries=None)
    return result.outcome.value


@shared_task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self: Task, delivery_id: int) -> str:
    result = run_delivery(get_runtime(), int(delivery_id))
    if result.outcome is DeliveryOutcome.RETRY and result.retry_at is not None:
        raise self.retry(eta=result.retry_at, max_retries=None)
    return result.outcome.value
