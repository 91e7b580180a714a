"""The node's own scheduler: study completion, waking workers, and the sweep.

Every tick (``completion_check_interval_s``):
  1. studies quiet for the quiet period become complete;
  2. ready annotations never sent to a worker are sent (this is what makes "whichever
     arrives last, study or ROI, wakes the worker" true);
  3. automatic jobs are created for the complete studies the site policy (``AUTO_ROI``) says
     to analyse, and the ready ones are sent;
  4. deliveries that are due are sent.
Every ``sweeper_interval_s`` it also re-sends ready work whose message is older than
``4 × sweeper_interval_s`` (lost with a broker restart or a killed worker) and work whose
worker's lease expired. Duplicate messages are harmless: a worker claims in the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.broker.wake import AUTO_TRIAGE, DELIVERY, TRIAGE, SendTask, send_marked
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    studies_completed: tuple[str, ...]
    triage_enqueued: tuple[int, ...]
    deliveries_enqueued: tuple[int, ...]
    auto_jobs_enqueued: tuple[int, ...] = ()


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        send: SendTask,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.send = send
        self.clock = clock
        self._last_sweep = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stale_after_s(self) -> float:
        return 4 * self.settings.sweeper_interval_s

    def tick(self, *, sweep: bool = False) -> SweepReport:
        """One pass; ``sweep`` also re-sends stale and expired work."""
        now = self.clock()
        with transaction(self.sessions) as session:
            completed = lifecycle.complete_quiet_studies(
                session, quiet_period_s=self.settings.quiet_period_s, now=now
            )
        for study_uid in completed:
            log.info(
                "study %s complete (quiet for %.0f s)", study_uid, self.settings.quiet_period_s
            )

        with transaction(self.sessions) as session:
            ready = lifecycle.ready_annotation_ids(
                session,
                now=now,
                stale_after_s=self.stale_after_s if sweep else None,
                include_unreceived=bool(self.settings.dicomweb_source_url),
            )
            lifecycle.mark_annotations_enqueued(session, ready, now)
        sent = send_marked(self.sessions, self.send, TRIAGE, ready)
        with transaction(self.sessions) as session:
            lifecycle.create_auto_jobs(
                session,
                policy=self.settings.auto_roi,
                fallback_s=self.settings.auto_roi_fallback_s,
                now=now,
            )
            auto_ready = lifecycle.ready_auto_job_ids(
                session, now=now, stale_after_s=self.stale_after_s if sweep else None
            )
            lifecycle.mark_auto_jobs_enqueued(session, auto_ready, now)
        auto_sent = send_marked(self.sessions, self.send, AUTO_TRIAGE, auto_ready)

        with transaction(self.sessions) as session:
            due = lifecycle.due_delivery_ids(session, now=now, stale_after_s=self.stale_after_s)
            lifecycle.mark_deliveries_enqueued(session, due, now)
        delivered_msgs = send_marked(self.sessions, self.send, DELIVERY, due)
        if sent or auto_sent or delivered_msgs:
            log.info(
                "woke workers: %d triage job(s), %d automatic job(s), %d delivery(ies)",
                len(sent),
                len(auto_sent),
                len(delivered_msgs),
            )
        return SweepReport(
            studies_completed=tuple(completed),
            triage_enqueued=tuple(sent),
            deliveries_enqueued=tuple(delivered_msgs),
            auto_jobs_enqueued=tuple(auto_sent),
        )

    def run(self) -> None:
        """Tick until :meth:`stop`; a database or broker outage is logged and waited out."""
        while not self._stop.is_set():
            monotonic = time.monotonic()
            sweep = monotonic - self._last_sweep >= self.settings.sweeper_interval_s
            try:
                self.tick(sweep=sweep)
                if sweep:
                    self._last_sweep = monotonic
            except SQLAlchemyError as exc:
                log.error("scheduler: database unavailable (%s); retrying", type(exc).__name__)
            self._stop.wait(self.settings.completion_check_interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
