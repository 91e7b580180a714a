"""``spine-triage up``: the whole system on one machine (embedded mode), optionally a demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.broker.app import TaskSender, make_celery
from dicom_node.dicom.scu import StorePeer, store_files
from dicom_node.node import start_node
from dicom_node.settings import FolderDestination, Settings
from dicom_node.web.access import api_token
from dicom_node.web.app import start_http
from dicom_node.web.auth import ADMIN, accounts
from model.synthetic.cases import make_cohort
from worker.commands import COMMANDS
from worker.commands.node import add_node_options, settings_from_args, wait_for_signal
from worker.runtime import default_checkpoint

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run the node (DICOM service, scheduler, HTTP API and worklist page) and one worker together,
with nothing to install: SQLite, storage and the broker live under ./var/ (or the settings'
values when set). The database schema is upgraded first. Without a configured checkpoint
the demonstration model is used: it is trained on synthetic phantoms on the first run and
cached under var/models. That first run takes about 3 to 6 minutes on a laptop CPU (2 cores;
progress bars in a terminal, one log line per epoch otherwise); later runs start in seconds.
It is NOT for clinical use, and every result it produces says so.

Without configured destinations, each Structured Report is also copied to var/results/.

Signing in: the worklist shows patient data, so it asks for a user. On the first start (no
user in the database yet) a user `admin` is made with a random password, written to
var/admin-password (mode 0600) and named on the screen; change it with `spine-triage users
passwd admin`, add people with `spine-triage users add NAME --role reader`. Scripts send the
API token in var/api-token as `Authorization: Bearer <token>`.

With --demo, synthetic spine CT studies are sent through the real path - C-STORE to this
node - and a reader's ROI is posted by the REST API for every other one; the others are
analysed automatically (AUTO_ROI=always, the default: the localiser finds every vertebral
body and the classifier judges them all), so the worklist fills with flagged and routine
studies, from readers' ROIs and from automatic analysis, within a minute or two.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help=COMMANDS["up"].help,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_node_options(parser)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="send synthetic studies and ROIs through the node once it runs",
    )
    parser.add_argument(
        "--demo-studies", type=int, default=6, metavar="N", help="studies for --demo (default 6)"
    )
    parser.add_argument("--demo-seed", type=int, default=2021, help="seed of the demo studies")
    parser.set_defaults(handler=run_up)


def run_up(args: argparse.Namespace) -> int:

    settings = settings_from_args(args)
    env = dict(os.environ)
    if not settings.destinations:
        results = (settings.var_dir / "results").resolve()
        folder = FolderDestination(name="results", path=results)
        settings = settings.model_copy(update={"destinations": [folder]})
        env["SPINE_TRIAGE_DESTINATIONS"] = json.dumps([folder.model_dump(mode="json")])
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    sign_in = first_admin(settings)

    if settings.model_checkpoint is None:
        print(
            "preparing the demonstration model (trained once on synthetic data, then cached; "
            "the first run takes about 3 to 6 minutes on a laptop CPU)",
            flush=True,
        )
    checkpoint = default_checkpoint(settings, progress=sys.stderr.isatty())
    print(f"model: {checkpoint}")

    sender = TaskSender(make_celery(settings, "spine_triage_up"))
    node = start_node(settings, send=sender)
    http = start_http(
        settings, node.sessions, sender, store_context=node.service.context, audit=node.audit
    )
    for key, value in {
        "SPINE_TRIAGE_AE_TITLE": settings.ae_title,
        "SPINE_TRIAGE_QUIET_PERIOD_S": str(settings.quiet_period_s),
    }.items():
        env.setdefault(key, value)
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--log-level", args.log_level, "worker"],
        env=env,
    )
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    scheme = "https" if settings.http_tls_enabled else "http"
    url = f"{scheme}://{host}:{http.port}/"
    print(
        f"\n  worklist:  {url}\n"
        f"  sign in:   {sign_in}\n"
        f"  DICOM:     AE {settings.ae_title} on port {node.dicom_address[1]}\n"
        f"  API token: {(settings.var_dir / 'api-token').resolve()} "
        "(Authorization: Bearer, admin role)\n"
        f"  results:   {', '.join(d.name for d in settings.destinations)}\n"
        "  stop with Ctrl-C\n",
        flush=True,
    )
    try:
        if args.demo:
            run_demo(settings, node.dicom_address[1], url, args.demo_studies, args.demo_seed)
        wait_for_signal()
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        http.stop()
        node.stop()
        sender.close()
    return 0


def first_admin(settings: Settings) -> str:
    """Make the user ``admin`` with a random password (in VAR_DIR/admin-password, 0600) when
    the database has no user yet; how to sign in, in words."""
    password_file = (settings.var_dir / "admin-password").resolve()
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            if accounts.count_users(session) == 0:
                password = secrets.token_urlsafe(18)
                accounts.add_user(session, "admin", password, ADMIN, now=datetime.now(UTC))
                password_file.unlink(missing_ok=True)
                descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as file:
                    file.write(password + "\n")
    finally:
        engine.dispose()
    if password_file.exists():
        return (
            f"user admin, password in {password_file} (made on the first start; "
            "change it: spine-triage users passwd admin)"
        )
    return "your user (an admin adds one: spine-triage users add NAME --role reader)"


def run_demo(settings: Any, dicom_port: int, url: str, studies: int, seed: int) -> None:
    """Synthetic studies by C-STORE to this node; a reader's ROI by the REST API for every
    other one (for all of them when automatic analysis is off)."""
    import requests

    folder = (settings.var_dir / "demo" / f"seed-{seed}").resolve()
    print(f"demo: writing {studies} synthetic studies to {folder}", flush=True)
    cases = make_cohort(folder, patients=studies, seed=seed)
    peer = StorePeer(
        ae_title=settings.ae_title,
        host="127.0.0.1",
        port=dicom_port,
        calling_ae_title="DEMO_MODALITY",
    )
    token = api_token(settings)
    with requests.Session() as client:
        client.headers["Authorization"] = f"Bearer {token}"
        for index, case in enumerate(cases):
            files = sorted(Path(case.series_dir).rglob("*.dcm"))
            store_files(files, peer)
            if index % 2 == 1 and settings.auto_roi != "off":
                print(
                    f"demo: sent {case.patient_id} ({len(files)} images), no ROI: "
                    "automatic analysis",
                    flush=True,
                )
                continue
            answer = client.post(
                f"{url.rstrip('/')}/annotations",
                json=case.roi.to_json(),
                headers={"Idempotency-Key": f"demo-{seed}-{case.patient_id}"},
                timeout=30,
            )
            answer.raise_for_status()
            print(
                f"demo: sent {case.patient_id} ({len(files)} images) and its ROI "
                f"-> annotation {answer.json()['id']}",
                flush=True,
            )
    print(
        f"demo: results appear within about {settings.quiet_period_s:.0f} s (the quiet period) "
        f"plus a few seconds at {url}",
        flush=True,
    )
