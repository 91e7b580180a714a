"""``spine-triage deliveries``: the outbox — list deliveries, re-send failed ones."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from dicom_node.archive.lifecycle import retry_failed_deliveries
from dicom_node.archive.schema import Delivery, DeliveryState
from worker.commands import COMMANDS, database_session


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "deliveries",
        help=COMMANDS["deliveries"].help,
        description=(
            "Every result is delivered to each configured destination (SPINE_TRIAGE_"
            "DESTINATIONS): SR to the PACS by C-STORE or STOW-RS, priority flags by HL7, "
            "Orthanc metadata or webhook. A failed attempt is retried with exponential "
            "backoff; after max_attempts (or a refusal that retrying cannot change) the "
            "delivery is 'failed' and stays so until re-sent with `deliveries retry`."
        ),
    )
    sub = parser.add_subparsers(dest="deliveries_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="deliveries, newest first")
    listing.add_argument("--state", choices=["pending", "sending", "delivered", "failed"])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=_list)
    retry = sub.add_parser("retry", help="re-send failed deliveries (all, or the ids given)")
    retry.add_argument("ids", nargs="*", type=int, help="delivery ids (default: every failed one)")
    retry.set_defaults(handler=_retry)


def _list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    with database_session() as session:
        query = select(Delivery).order_by(Delivery.id.desc()).limit(args.limit)
        if args.state:
            query = query.where(Delivery.state == DeliveryState(args.state))
        rows = list(session.scalars(query))
    if not rows:
        print("no deliveries")
        return 0
    print(
        f"{'ID':>6} {'RESULT':>6} {'DESTINATION':<16} {'KIND':<8} {'STATE':<10} {'TRIES':>5}  ERROR"
    )
    for row in rows:
        print(
            f"{row.id:>6} {row.result_id:>6} {row.destination:<16} {row.kind:<8} "
            f"{row.state.value:<10} {row.attempts:>3}/{row.max_attempts:<3} {row.last_error or ''}"
        )
    return 0


def _retry(args: argparse.Namespace) -> int:

    with database_session(write=True) as session:
        ids = retry_failed_deliveries(session, args.ids or None, now=datetime.now(UTC))
    if not ids:
        print("no failed delivery to re-send")
        return 1 if args.ids else 0
    print(f"re-queued {len(ids)} delivery(ies): {', '.join(map(str, ids))}")
    print("the node's scheduler sends them to a worker within a second")
    return 0
