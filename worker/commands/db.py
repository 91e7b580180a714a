"""``spine-triage db`` and ``spine-triage config``: schema migrations and settings."""

from __future__ import annotations

import argparse
from typing import Any

from dicom_node.archive.db import make_engine
from dicom_node.archive.migrate import current_revision, downgrade, head_revision, upgrade
from dicom_node.settings import load_settings
from worker.commands import COMMANDS
from worker.commands.settings_reference import render_env_example, render_settings_markdown


def register(subparsers: Any) -> None:
    db = subparsers.add_parser(
        "db",
        help=COMMANDS["db"].help,
        description=(
            "Manage the database schema. Tables are created and changed only through the "
            "migrations shipped with this release; run `db upgrade` after installing or "
            "upgrading, before starting the node or workers. Works on SQLite and PostgreSQL "
            "(SPINE_TRIAGE_DATABASE_URL)."
        ),
    )
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser("upgrade", help="upgrade the schema (default: to the newest)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    up.set_defaults(handler=_upgrade)
    down = db_sub.add_parser("downgrade", help="downgrade the schema to REVISION ('base': empty)")
    down.add_argument("revision", help="target revision")
    down.set_defaults(handler=_downgrade)
    current = db_sub.add_parser("current", help="show the schema revision of the database")
    current.set_defaults(handler=_current)

    config = subparsers.add_parser(
        "config",
        help=COMMANDS["config"].help,
        description="Inspect the settings (environment variables with prefix SPINE_TRIAGE_).",
    )
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    example = config_sub.add_parser(
        "env-example", help="print every setting with its default and meaning (.env.example)"
    )
    example.set_defaults(handler=_env_example)
    docs = config_sub.add_parser(
        "settings-doc", help="print the settings reference in Markdown (docs/settings.md)"
    )
    docs.set_defaults(handler=_settings_doc)
    show = config_sub.add_parser("show", help="print the effective settings (secrets hidden)")
    show.set_defaults(handler=_show)


def _upgrade(args: argparse.Namespace) -> int:

    settings = load_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url, args.revision)
    print(f"database schema at {args.revision}")
    return 0


def _downgrade(args: argparse.Namespace) -> int:

    downgrade(load_settings().resolved_database_url, args.revision)
    print(f"database schema at {args.revision}")
    return 0


def _current(args: argparse.Namespace) -> int:

    engine = make_engine(load_settings().resolved_database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else f"needs upgrade to {head}"
    print(f"{current or 'empty'} ({state})")
    return 0 if current == head else 1


def _env_example(args: argparse.Namespace) -> int:

    print(render_env_example())
    return 0


def _settings_doc(args: argparse.Namespace) -> int:

    print(render_settings_markdown(), end="")
    return 0


def _show(args: argparse.Namespace) -> int:

    settings = load_settings()
    for name, value in settings.model_dump().items():
        if ("token" in name or "password" in name) and value:
            value = "********"
        print(f"{name} = {value}")
    print(f"(database: {_redact_url(settings.resolved_database_url)})")
    return 0


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
