"""``spine-triage studies``: what the node received and where each study stands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dicom_node.archive.schema import Series, Study, StudyState
from worker.commands import COMMANDS, database_session


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "studies",
        help=COMMANDS["studies"].help,
        description=(
            "List the studies in the node's index, newest first. A study is 'receiving' while "
            "instances keep arriving and 'complete' once no instance arrived for the quiet "
            "period (SPINE_TRIAGE_QUIET_PERIOD_S). Patient names are not shown."
        ),
    )
    parser.add_argument("--state", choices=["receiving", "complete"], help="only this state")
    parser.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_list)


def _list(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    with database_session() as session:
        query = select(Study).order_by(Study.last_received_at.desc()).limit(args.limit)
        if args.state:
            query = query.where(Study.state == StudyState(args.state))
        studies = list(session.scalars(query))
        counts = session.execute(
            select(Series.study_id, func.count(Series.id))
            .where(Series.study_id.in_([study.id for study in studies]))
            .group_by(Series.study_id)
        ).all()
        series_counts: dict[int, int] = {study_id: count for study_id, count in counts}
    rows = [
        {
            "study_instance_uid": study.study_instance_uid,
            "state": study.state.value,
            "series": series_counts.get(study.id, 0),
            "instances": study.instance_count,
            "first_received_at": study.first_received_at.isoformat(timespec="seconds"),
            "last_received_at": study.last_received_at.isoformat(timespec="seconds"),
            "completed_at": (
                study.completed_at.isoformat(timespec="seconds") if study.completed_at else None
            ),
        }
        for study in studies
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no studies")
        return 0
    print(f"{'STUDY INSTANCE UID':<64} {'STATE':<9} {'SER':>3} {'INST':>5}  LAST RECEIVED (UTC)")
    for row in rows:
        print(
            f"{row['study_instance_uid']:<64} {row['state']:<9} {row['series']:>3} "
            f"{row['instances']:>5}  {row['last_received_at']}"
        )
    return 0
