"""``spine-triage audit``: the audit trail for the security officer — list and filter events."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from dicom_node.archive.schema import AuditEvent
from worker.commands import COMMANDS

EVENT_TYPES = (
    "application-activity",
    "audit-log-used",
    "export",
    "instances-accessed",
    "instances-transferred",
    "query",
    "security-alert",
    "user-authentication",
)
OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit",
        help=COMMANDS["audit"].help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "List the audit trail: every event after DICOM PS3.15 A.5 (IHE ATNA) the node, "
            "its listeners and the workers recorded in the audit table, oldest first, with "
            "who, from where, which patient and study. The table is append-only and the record "
            "of truth; the same messages go to the site's audit repository when "
            "SPINE_TRIAGE_AUDIT_SYSLOG_HOST is set. Reading the trail is itself audited "
            "(Audit Log Used). The output holds patient IDs: treat it as patient data.\n\n"
            "event types: " + ", ".join(EVENT_TYPES) + "\n\n"
            "examples:\n"
            "  spine-triage audit --patient PID-42            who touched this patient's data\n"
            "  spine-triage audit --user dr.house --since 2026-12-01\n"
            "  spine-triage audit --type security-alert --type user-authentication --failures\n"
            "  spine-triage audit --study 1.2.3 --json --messages   the full XML of each event"
        ),
    )
    parser.add_argument("--patient", help="events naming this patient ID")
    parser.add_argument("--user", help="events of this user, token, AE title or worker")
    parser.add_argument("--study", help="events naming this Study Instance UID")
    parser.add_argument(
        "--type",
        action="append",
        choices=EVENT_TYPES,
        dest="types",
        metavar="TYPE",
        help="event type, as listed above (repeat for several)",
    )
    parser.add_argument("--failures", action="store_true", help="only events that failed")
    parser.add_argument(
        "--since", type=_moment, help="from this time (YYYY-MM-DD or ISO 8601; naive is UTC)"
    )
    parser.add_argument(
        "--until",
        type=_moment_end,
        help="up to this time (a date includes its whole day)",
    )
    parser.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    parser.add_argument("--json", action="store_true", help="JSON, one object per event")
    parser.add_argument(
        "--messages", action="store_true", help="with --json: each event's audit message XML"
    )
    parser.set_defaults(handler=run_audit)


def _parse(text: str) -> tuple[datetime, bool]:
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC), True
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), False


def _moment(text: str) -> datetime:
    return _parse(text)[0]


def _moment_end(text: str) -> datetime:
    moment, whole_day = _parse(text)
    return moment + timedelta(days=1) if whole_day else moment


def _row(event: AuditEvent, with_message: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": event.id,
        "time": event.event_time.isoformat(),
        "type": event.event_type,
        "event_id": event.event_id_code,
        "action": event.event_action,
        "outcome": event.outcome,
        "user": event.user_id,
        "address": event.client_address,
        "patient_id": event.patient_id,
        "study_instance_uid": event.study_instance_uid,
        "source": event.source_id,
    }
    if with_message:
        row["message"] = event.message
    return row


def run_audit(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from dicom_node.archive.db import make_engine, make_session_factory
    from dicom_node.audit import AuditTrail, messages
    from dicom_node.settings import load_settings

    query = select(AuditEvent).order_by(AuditEvent.id)
    if args.patient:
        query = query.where(AuditEvent.patient_id == args.patient)
    if args.user:
        query = query.where(AuditEvent.user_id == args.user)
    if args.study:
        query = query.where(AuditEvent.study_instance_uid == args.study)
    if args.types:
        query = query.where(AuditEvent.event_type.in_(args.types))
    if args.failures:
        query = query.where(AuditEvent.outcome != 0)
    if args.since:
        query = query.where(AuditEvent.event_time >= args.since)
    if args.until:
        query = query.where(AuditEvent.event_time < args.until)
    settings = load_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        sessions = make_session_factory(engine)
        with sessions() as session:
            events = list(session.scalars(query.limit(args.limit)))
        # Reading the trail is an audited event itself (A.5.3.2 Audit Log Used).
        trail = AuditTrail.from_settings(
            settings, sessions, source_id=f"{socket.gethostname()} spine-triage audit"
        )
        try:
            trail.record(
                messages.audit_log_used(
                    trail.source,
                    user=_os_user(),
                    log_uri=f"{engine.url.render_as_string(hide_password=True)}#audit_event",
                )
            )
        finally:
            trail.close()
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps([_row(event, args.messages) for event in events], indent=2))
        return 0
    if not events:
        print("no audit events match")
        return 0
    print(
        f"{'ID':>7}  {'TIME (UTC)':<23} {'TYPE':<22} {'OUTCOME':<14} {'USER':<20} "
        f"{'ADDRESS':<16} {'PATIENT':<16} STUDY"
    )
    for event in events:
        print(
            f"{event.id:>7}  {event.event_time.strftime('%Y-%m-%d %H:%M:%S.%f')[:23]:<23} "
            f"{event.event_type:<22} {OUTCOMES.get(event.outcome, str(event.outcome)):<14} "
            f"{(event.user_id or '-')[:20]:<20} {(event.client_address or '-')[:16]:<16} "
            f"{(event.patient_id or '-')[:16]:<16} {event.study_instance_uid or '-'}"
        )
    return 0


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
