"""The ``spine-triage`` command line.

Each subcommand lives in a module of :mod:`worker.commands` that exposes
``register(subparsers)``; this module only assembles them, so importing it stays cheap
(heavy imports such as torch happen inside the command that needs them).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "worker.commands.node",
    "worker.commands.worker",
    "worker.commands.up",
    "worker.commands.db",
    "worker.commands.studies",
    "worker.commands.annotations",
    "worker.commands.deliveries",
    "worker.commands.model",
    "worker.commands.training",
)

DESCRIPTION = """\
spine-triage: a DICOM node and worker fleet that flags spine CT studies with a likely
malignant vertebral fracture for priority reading (computer-aided triage, never diagnosis).

A PACS sends studies by C-STORE; a radiologist's ROI on the most abnormal vertebra arrives as
a DICOM SR, by REST or from a CSV; workers run a ResNet50 classifier and send a DICOM
Structured Report and a priority flag back to the PACS and the reading worklist.

Settings come from the environment (prefix SPINE_TRIAGE_, see .env.example) or a .env file
in the working directory. Without any, everything runs embedded: SQLite, storage and a local
broker under ./var/.
"""

EPILOG = """\
typical first run:
  spine-triage up --demo      node + worker, synthetic studies fed through the real path
  spine-triage studies        what the node has received and where each study stands

run 'spine-triage COMMAND --help' for the details of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spine-triage",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO; patient data is never logged at INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        for noisy in ("alembic", "pynetdicom", "httpx", "highdicom", "celery.worker.strategy"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = args.handler
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
