"""Subcommands of ``spine-triage``; each module exposes ``register(subparsers)``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@contextmanager
def database_session(*, write: bool = False) -> Iterator[Session]:
    """A session on the configured database for one command (one transaction when ``write``);
    the engine is disposed of afterwards."""
    from dicom_node.archive.db import make_engine, make_session_factory, transaction
    from dicom_node.settings import load_settings

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
