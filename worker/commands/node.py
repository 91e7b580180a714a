"""``spine-triage node``: the DICOM node (C-ECHO/C-STORE SCP, scheduler, HTTP API)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from dicom_node.archive.migrate import SchemaOutOfDate
from dicom_node.broker.app import TaskSender, make_celery
from dicom_node.node import start_node
from dicom_node.settings import load_settings
from dicom_node.web.app import start_http
from dicom_node.web.auth import accounts
from worker.commands import COMMANDS

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "node",
        help=COMMANDS["node"].help,
        description=(
            "Run the node: a DICOM service accepting C-ECHO and C-STORE (CT, Enhanced CT, Legacy "
            "Converted Enhanced CT, and SR for ROI annotations) that acknowledges an instance "
            "only once it is fsynced and indexed; the scheduler that marks studies complete "
            "after the quiet period and wakes workers; and the HTTP service (REST API, "
            "worklist page, metrics). Settings come from SPINE_TRIAGE_* variables; the options "
            "below override them."
        ),
    )
    add_node_options(parser)
    parser.set_defaults(handler=run_node)


def add_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ae-title", help="AE title (default SPINE_TRIAGE)")
    parser.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    parser.add_argument(
        "--quiet-period", type=float, dest="quiet_period_s", help="study quiet period in s"
    )
    parser.add_argument(
        "--no-http", action="store_true", help="do not start the HTTP service (DICOM only)"
    )


def settings_from_args(args: argparse.Namespace) -> Any:

    overrides = {
        key: value
        for key, value in {
            "ae_title": getattr(args, "ae_title", None),
            "dicom_port": getattr(args, "dicom_port", None),
            "http_port": getattr(args, "http_port", None),
            "quiet_period_s": getattr(args, "quiet_period_s", None),
        }.items()
        if value is not None
    }
    return load_settings(**overrides)


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def run_node(args: argparse.Namespace) -> int:

    settings = settings_from_args(args)
    sender = TaskSender(make_celery(settings, "spine_triage_node"))
    try:
        node = start_node(settings, send=sender)
    except SchemaOutOfDate as exc:
        log.error("%s", exc)
        return 2
    http = None
    if not args.no_http:
        http = start_http(
            settings, node.sessions, sender, store_context=node.service.context, audit=node.audit
        )
        with node.sessions() as session:
            if accounts.count_users(session) == 0:
                log.warning(
                    "no user can sign in to the worklist yet: "
                    "spine-triage users add NAME --role admin"
                )
    try:
        wait_for_signal()
    finally:
        log.info("stopping")
        if http is not None:
            http.stop()
        node.stop()
        sender.close()
    return 0
