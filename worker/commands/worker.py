"""``spine-triage worker``: a Celery worker that runs triage jobs and deliveries."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from dicom_node.broker.wake import DELIVERY_QUEUE, TRIAGE_QUEUE
from dicom_node.settings import load_settings
from model.serving.checkpoint import CheckpointError
from worker.celery_app import make_app
from worker.commands import COMMANDS
from worker.runtime import (
    CheckpointRefused,
    default_checkpoint,
    get_runtime,
    verify_checkpoints,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help=COMMANDS["worker"].help,
        description=(
            "Run a Celery worker. It takes triage jobs (claim an ROI annotation in the "
            "database, load the CT series, run the classifier, write the Structured Report) "
            "and deliveries (SR to the PACS, priority flags) from the broker "
            "(SPINE_TRIAGE_BROKER_URL; embedded mode: a local folder). Start as many as you "
            "like, on any machine that reaches the database, the broker and the storage. "
            "The model is loaded once per worker process (SPINE_TRIAGE_MODEL_CHECKPOINT; "
            "default: the demonstration model, trained on first use); a worker refuses to "
            "start when a configured checkpoint differs from its pinned sha256 "
            "(SPINE_TRIAGE_MODEL_CHECKPOINT_SHA256, SPINE_TRIAGE_CANDIDATE_CHECKPOINT_SHA256)."
        ),
    )
    parser.add_argument(
        "--queues",
        default=f"{TRIAGE_QUEUE},{DELIVERY_QUEUE}",
        help=f"queues to consume (default {TRIAGE_QUEUE},{DELIVERY_QUEUE}; a GPU worker may "
        f"take only {TRIAGE_QUEUE}, a CPU worker only {DELIVERY_QUEUE})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="jobs run at once in this worker (threads; default 2: one delivery can go out "
        "while a job runs)",
    )
    parser.add_argument("--hostname", help="Celery node name (default: celery@HOST)")
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:

    settings = load_settings()
    if TRIAGE_QUEUE in args.queues.split(","):
        default_checkpoint(settings)  # a demonstration model is trained before taking jobs
        try:
            for model in verify_checkpoints(settings):
                print(f"{model.role} model: {model.name} {model.version} sha256 {model.sha256}")
        except (CheckpointRefused, CheckpointError, OSError) as exc:
            raise SystemExit(f"spine-triage worker: refusing to start: {exc}") from exc
    app = make_app(settings)
    argv = [
        "worker",
        f"--queues={args.queues}",
        "--pool=threads",
        f"--concurrency={args.concurrency}",
        f"--loglevel={args.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    trail = get_runtime().audit
    name = f"spine-triage worker {args.hostname or socket.gethostname()}"
    trail.application_started(name)
    try:
        app.worker_main(argv)
    finally:
        trail.application_stopped(name)
        trail.close()
    return 0
