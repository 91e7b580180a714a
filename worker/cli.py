"""The ``spine-triage`` command line.

Each subcommand lives in a module of :mod:`worker.commands` (the table
:data:`worker.commands.COMMANDS`). Only the module of the command being run is imported,
with everything it needs; the others appear in the top-level help by their one-line summary.
So ``spine-triage --help`` and ``spine-triage studies`` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from worker.commands import COMMANDS

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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full definition of the command ``argv`` names (of all commands
    when ``argv`` is None) and a summary line for the others."""
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
    if argv is None:
        modules = list(dict.fromkeys(command.module for command in COMMANDS.values()))
    else:
        chosen = _command_of(argv)
        modules = [COMMANDS[chosen].module] if chosen in COMMANDS else []
    for module in modules:
        importlib.import_module(module).register(subparsers)
    for name, command in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=command.help, add_help=False)
    ordered = {name: subparsers.choices[name] for name in COMMANDS}
    subparsers.choices.clear()
    subparsers.choices.update(ordered)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option (or the value of ``--log-level``)."""
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--log-level":
            next(arguments, None)
        elif not argument.startswith("-"):
            return argument
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
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
