"""``spine-triage annotations``: list, show and bulk-import ROI annotations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.lifecycle import retry_failed_annotations
from dicom_node.archive.roi_csv import CsvImportError, import_rows, parse_csv
from dicom_node.archive.schema import AnnotationState, RoiAnnotation
from dicom_node.settings import load_settings
from dicom_node.web.access import ApiState
from dicom_node.web.annotations import annotation_view
from worker.commands import COMMANDS, database_session


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "annotations",
        help=COMMANDS["annotations"].help,
        description=(
            "ROI annotations are the triage jobs: a radiologist's ROI on the most abnormal "
            "vertebra (sagittal polygon in mm plus 3-5 sagittal slice positions). A job runs "
            "when its study is complete. States: pending (waiting for the study or a worker), "
            "processing (a worker holds it), done (a result exists), failed (see the reason)."
        ),
    )
    sub = parser.add_subparsers(dest="annotations_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="annotations, newest first")
    listing.add_argument("--state", choices=["pending", "processing", "done", "failed"])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", help="one annotation with its result and deliveries (JSON)")
    show.add_argument("id", type=int)
    show.set_defaults(handler=_show)
    retry = sub.add_parser(
        "retry",
        help="run failed annotations again (all, or the ids given) once the cause is fixed",
    )
    retry.add_argument(
        "ids", nargs="*", type=int, help="annotation ids (default: every failed one)"
    )
    retry.set_defaults(handler=_retry)
    imp = sub.add_parser(
        "import",
        help="import ROI annotations from a CSV file (all rows or none)",
        description=(
            "Import annotations from CSV. Columns: study_instance_uid, series_instance_uid, "
            "slices_x_mm (e.g. '-3;0;3' or a JSON list), polygon_yz_mm (e.g. "
            "'10 20;30 20;30 40;10 40' or a JSON list of [y, z]), and optionally vertebra, "
            "annotator. Every row is validated first; any problem is reported with its row "
            "number and nothing is imported. Importing the same rows again adds nothing."
        ),
    )
    imp.add_argument("csv", type=Path, help="the CSV file")
    imp.set_defaults(handler=_import)


def _list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    with database_session() as session:
        query = select(RoiAnnotation).order_by(RoiAnnotation.id.desc()).limit(args.limit)
        if args.state:
            query = query.where(RoiAnnotation.state == AnnotationState(args.state))
        rows = list(session.scalars(query))
    if not rows:
        print("no annotations")
        return 0
    print(f"{'ID':>6} {'STATE':<10} {'SOURCE':<6} {'TRIES':>5}  STUDY / REASON")
    for row in rows:
        print(
            f"{row.id:>6} {row.state.value:<10} {row.source:<6} {row.attempts:>5}  "
            f"{row.study_instance_uid}"
        )
        if row.failure_reason:
            print(f"{'':>31}{row.failure_reason}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from fastapi import HTTPException

    settings = load_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        state = ApiState(settings, make_session_factory(engine), None, token="")
        try:
            view = annotation_view(state, args.id)
        except HTTPException as exc:
            print(exc.detail, file=sys.stderr)
            return 1
    finally:
        engine.dispose()
    print(json.dumps(view, indent=2))
    return 0


def _import(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    try:
        rows = parse_csv(args.csv.read_text(encoding="utf-8-sig"))
    except CsvImportError as exc:
        print(f"{args.csv}: nothing imported:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.csv}: {exc.strerror}", file=sys.stderr)
        return 1
    with database_session(write=True) as session:
        stored = import_rows(session, rows, now=datetime.now(UTC))
    new = sum(1 for item in stored if item.created)
    print(f"{len(stored)} row(s): {new} new annotation(s), {len(stored) - new} already known")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    with database_session(write=True) as session:
        ids = retry_failed_annotations(session, args.ids or None, now=datetime.now(UTC))
    if not ids:
        print("no failed annotation to run again")
        return 1 if args.ids else 0
    print(f"{len(ids)} annotation(s) pending again: {', '.join(map(str, ids))}")
    return 0
