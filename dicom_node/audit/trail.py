"""The audit trail of one process: each event into the audit table, then to the repository.

The ``audit_event`` table is the record of truth: an event is written there first (one short
transaction), then its RFC 5424 message is queued for the audit repository
(:class:`~dicom_node.audit.syslog.SyslogForwarder`). Neither step ever raises into the
caller (the DICOM or HTTP path): a database failure is logged (no patient data) and counted,
a full queue is counted. Counters are process-wide, for ``/metrics``.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.schema import AuditEvent
from dicom_node.audit import messages
from dicom_node.audit.messages import AuditRecord, AuditSource
from dicom_node.audit.syslog import SyslogForwarder, SyslogTarget, format_rfc5424

if TYPE_CHECKING:
    from dicom_node.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "spine_triage"

EVENTS_RECORDED = Counter(
    f"{PREFIX}_audit_events",
    "Audit events this process wrote to the audit table, since it started.",
    ["event_type"],
    registry=None,
)
EVENTS_LOST = Counter(
    f"{PREFIX}_audit_events_unrecorded",
    "Audit events this process could not write to the audit table (database unavailable).",
    registry=None,
)
SYSLOG_SENT = Counter(
    f"{PREFIX}_audit_syslog_sent",
    "Audit messages this process sent to the audit repository.",
    registry=None,
)
SYSLOG_DROPPED = Counter(
    f"{PREFIX}_audit_syslog_dropped",
    "Audit messages this process did not send because its queue was full (the repository "
    "was unreachable for long); each is in the audit table.",
    registry=None,
)
SYSLOG_RESENT = Counter(
    f"{PREFIX}_audit_syslog_resent",
    "Dropped audit messages this process read again from the audit table and queued.",
    registry=None,
)
SYSLOG_FAILURES = Counter(
    f"{PREFIX}_audit_syslog_failures",
    "Failed attempts to send an audit message (each one retried).",
    registry=None,
)

_trails: list[AuditTrail] = []
_trails_lock = threading.Lock()


class AuditTrail:
    """Records audit events of one process (the node, a listener, a worker)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        source: AuditSource,
        *,
        forwarder: SyslogForwarder | None = None,
        writer_lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.sessions = sessions
        self.source = source
        self.forwarder = forwarder
        self._writer_lock = writer_lock if writer_lock is not None else nullcontext()
        self._reported = (0, 0, 0, 0)
        self._sync_lock = threading.Lock()
        # Ids of events whose message a full queue dropped: sent again from the table.
        self._unsent: deque[int] = deque(maxlen=1_000_000)
        if forwarder is not None:
            forwarder.refill = self._refill
        with _trails_lock:
            _trails.append(self)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        source_id: str,
        type_code: str = "4",
        writer_lock: AbstractContextManager[object] | None = None,
    ) -> AuditTrail:
        forwarder = None
        if settings.audit_syslog_host:
            forwarder = SyslogForwarder(
                SyslogTarget(
                    host=settings.audit_syslog_host,
                    port=settings.resolved_audit_syslog_port,
                    transport=settings.audit_syslog_transport,
                    ca_certificates=settings.audit_syslog_ca_certificates,
                    certificate=settings.audit_syslog_certificate,
                    private_key=settings.audit_syslog_private_key,
                ),
                queue_size=settings.audit_queue_size,
            )
        source = AuditSource(
            source_id=source_id,
            enterprise_site_id=settings.audit_enterprise_site_id or None,
            type_code=type_code,
        )
        return cls(sessions, source, forwarder=forwarder, writer_lock=writer_lock)

    def record(self, record: AuditRecord) -> int | None:
        """Write the event, queue its message; returns its row id (None: not written)."""
        try:
            row = AuditEvent(
                event_time=record.event_time,
                event_type=record.event_type,
                event_id_code=record.event_id.code,
                event_action=record.action,
                outcome=record.outcome,
                user_id=_clip(record.user_id, 256),
                client_address=_clip(record.client_address, 64),
                patient_id=_clip(record.patient_id, 64),
                study_instance_uid=_clip(record.study_instance_uid, 64),
                source_id=_clip(record.source_id, 64) or "spine-triage",
                message=record.message,
            )
            with self._writer_lock, self.sessions() as session, session.begin():
                session.add(row)
                session.flush()
                event_id = int(row.id)
        except Exception as exc:  # the audited path goes on; the loss is logged and counted
            EVENTS_LOST.inc()
            log.error("audit event %s not recorded: %s", record.event_type, type(exc).__name__)
            return None
        EVENTS_RECORDED.labels(record.event_type).inc()
        if self.forwarder is not None:
            frame = format_rfc5424(
                record.message, timestamp=record.event_time, sequence_id=event_id
            )
            if not self.forwarder.submit(frame):
                self._unsent.append(event_id)
                log.warning("audit event %d not sent yet: the repository queue is full", event_id)
        self._sync_counters()
        return event_id

    def _sync_counters(self) -> None:
        if self.forwarder is None:
            return
        with self._sync_lock:
            stats = self.forwarder.stats
            now = (stats.sent, stats.dropped, stats.failures, stats.resent)
            for counter, value, last in zip(
                (SYSLOG_SENT, SYSLOG_DROPPED, SYSLOG_FAILURES, SYSLOG_RESENT),
                now,
                self._reported,
                strict=True,
            ):
                counter.inc(value - last)
            self._reported = now

    @property
    def unsent(self) -> int:
        """Events in the table whose message is still to be sent again."""
        return len(self._unsent)

    def _refill(self, limit: int) -> list[bytes]:
        """Up to ``limit`` dropped messages, read again from the table (sender thread)."""
        ids: list[int] = []
        while self._unsent and len(ids) < limit:
            ids.append(self._unsent.popleft())
        if not ids:
            return []
        try:
            with self.sessions() as session:
                rows = list(
                    session.scalars(
                        select(AuditEvent).where(AuditEvent.id.in_(ids)).order_by(AuditEvent.id)
                    )
                )
        except Exception:
            self._unsent.extendleft(reversed(ids))
            raise
        return [
            format_rfc5424(row.message, timestamp=row.event_time, sequence_id=row.id)
            for row in rows
        ]

    # The events every process reports about itself.

    def application_started(self, application: str) -> int | None:
        return self.record(
            messages.application_activity(
                self.source,
                started=True,
                application=application,
                launcher=_os_user(),
                address=socket.gethostname(),
            )
        )

    def application_stopped(self, application: str) -> int | None:
        return self.record(
            messages.application_activity(
                self.source,
                started=False,
                application=application,
                launcher=_os_user(),
                address=socket.gethostname(),
            )
        )

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (up to ``timeout_s``) and stop the sender thread."""
        if self.forwarder is not None:
            self.forwarder.stop(timeout_s)
            self._sync_counters()
        with _trails_lock:
            if self in _trails:
                _trails.remove(self)


def _clip(value: str | None, limit: int) -> str | None:
    return value[:limit] if value is not None else None


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd entry)
        return None


class AuditCounters(Collector):
    """The process's audit counters and its queued messages, for ``/metrics``."""

    def collect(self) -> Iterator[Metric]:
        with _trails_lock:
            trails = list(_trails)
        for trail in trails:
            trail._sync_counters()
        yield from EVENTS_RECORDED.collect()
        yield from EVENTS_LOST.collect()
        yield from SYSLOG_SENT.collect()
        yield from SYSLOG_DROPPED.collect()
        yield from SYSLOG_FAILURES.collect()
        yield from SYSLOG_RESENT.collect()
        unsent = GaugeMetricFamily(
            f"{PREFIX}_audit_syslog_unsent",
            "Audit events of this process a full queue dropped, not yet sent again.",
        )
        unsent.add_metric([], sum(t.unsent for t in trails))
        yield unsent
        pending = GaugeMetricFamily(
            f"{PREFIX}_audit_syslog_queued",
            "Audit messages of this process waiting to be sent to the audit repository.",
        )
        pending.add_metric([], sum(t.forwarder.pending for t in trails if t.forwarder))
        yield pending
