"""How the node and the workers wake workers: Celery task *names*, queues, one message per id.

The database is the source of truth; a broker message only wakes a worker. Work that gets a
message is marked enqueued first (:mod:`dicom_node.archive.lifecycle`); a message that cannot
be sent has its mark cleared, so the scheduler's next tick sends it; a lost one is sent again
by the sweep after it went stale. A duplicate message is harmless: a worker must claim the
work in the database before it runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import transaction
from dicom_node.archive.lifecycle import (
    clear_annotation_marks,
    clear_auto_job_marks,
    clear_delivery_marks,
)

log = logging.getLogger(__name__)

# Celery task names: the node sends by name, so it never imports the worker.
TRIAGE_TASK = "spine_triage.triage_annotation"
AUTO_TRIAGE_TASK = "spine_triage.triage_study"  # an automatic job (every body of a study)
DELIVER_TASK = "spine_triage.deliver"
TRIAGE_QUEUE = "triage"
DELIVERY_QUEUE = "delivery"

SendTask = Callable[[str, Sequence[int], str], None]
"""``send(task_name, args, queue)``: publishes one message (ids only)."""


@dataclass(frozen=True)
class Wakeup:
    """One kind of work: its task, its queue, and how to clear the mark of an unsent id."""

    task: str
    queue: str
    clear_marks: Callable[[Session, Sequence[int]], None]


TRIAGE = Wakeup(TRIAGE_TASK, TRIAGE_QUEUE, clear_annotation_marks)
AUTO_TRIAGE = Wakeup(AUTO_TRIAGE_TASK, TRIAGE_QUEUE, clear_auto_job_marks)
DELIVERY = Wakeup(DELIVER_TASK, DELIVERY_QUEUE, clear_delivery_marks)


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


def send_marked(
    sessions: sessionmaker[Session], send: SendTask | None, kind: Wakeup, ids: Sequence[int]
) -> list[int]:
    """Send a message for each id already marked enqueued (and committed); the marks of
    those that could not be sent are cleared. Returns the ids sent."""
    if not ids:
        return []
    sent = publish(send, kind.task, ids, kind.queue) if send is not None else []
    unsent = sorted(set(ids) - set(sent))
    if unsent and send is not None:
        with transaction(sessions) as session:
            kind.clear_marks(session, unsent)
    return sent
