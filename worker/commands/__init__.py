"""Subcommands of ``spine-triage``.

Each module of this package defines one or more commands and exposes
``register(subparsers)``; :data:`COMMANDS` says which module defines which command. The
command line imports only the module of the command it runs (``spine-triage --help`` imports
none), so a module imports what its commands need at its top, torch included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.settings import load_settings


@dataclass(frozen=True)
class Command:
    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "node": Command(
        "worker.commands.node",
        "run the DICOM node: receive studies, detect completion, wake workers",
    ),
    "worker": Command(
        "worker.commands.worker",
        "run a worker: triage jobs (model inference, SR) and result deliveries",
    ),
    "up": Command(
        "worker.commands.up",
        "run node + worker together (embedded mode); --demo feeds synthetic studies",
    ),
    "db": Command(
        "worker.commands.db", "create or upgrade the database schema (Alembic migrations)"
    ),
    "config": Command("worker.commands.db", "show settings; write .env.example"),
    "studies": Command(
        "worker.commands.studies",
        "list received studies with their state, instance counts and times",
    ),
    "annotations": Command(
        "worker.commands.annotations", "list, show or import ROI annotations (the triage jobs)"
    ),
    "deliveries": Command(
        "worker.commands.deliveries", "list result deliveries; re-send failed ones"
    ),
    "users": Command(
        "worker.commands.users", "add, list, disable users of the worklist; set a password"
    ),
    "tokens": Command(
        "worker.commands.users", "create, list, revoke API tokens for clients (PACS, scripts)"
    ),
    "audit": Command(
        "worker.commands.audit",
        "the audit trail: who received, sent, opened or searched which patient's data, when",
    ),
    "synth": Command(
        "worker.commands.model", "write synthetic spine CT studies with ROI and label"
    ),
    "preprocess": Command(
        "worker.commands.model", "save the network inputs of an ROI to an .npz file"
    ),
    "propose": Command(
        "worker.commands.propose",
        "localise the vertebral bodies of a CT series and propose an ROI on each",
    ),
    "classify": Command(
        "worker.commands.classify",
        "classify one study from files on disk (reader ROI or automatic), as a worker would",
    ),
    "train": Command(
        "worker.commands.training",
        "train a checkpoint on a labelled cohort (or synthetic phantoms)",
    ),
    "evaluate": Command(
        "worker.commands.training", "patient-level k-fold cross-validation with the paper's table"
    ),
    "validate": Command(
        "worker.commands.validate",
        "score a fixed checkpoint on a labelled cohort (no training), with the paper's table",
    ),
    "models": Command(
        "worker.commands.models",
        "the configured checkpoints (name, version, sha256); shadow mode's live vs candidate",
    ),
    "demo-model": Command(
        "worker.commands.training",
        "train (once) and cache the demonstration model on synthetic phantoms",
    ),
}


@contextmanager
def database_session(*, write: bool = False) -> Iterator[Session]:
    """A session on the configured database for one command (one transaction when ``write``);
    the engine is disposed of afterwards."""
    engine = make_engine(load_settings().resolved_database_url)
    try:
        factory = make_session_factory(engine)
        if write:
            with transaction(factory) as session:
                yield session
        else:
            with factory() as session:
                yield session
    finally:
        engine.dispose()
