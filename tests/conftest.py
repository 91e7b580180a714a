from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.faults.ledger import ledger  # noqa: F401 - fixture of the fault suite
from tests.system import (  # noqa: F401 - fixtures of the whole-system tests
    checkpoint_path,
    synthetic_cases,
    system_factory,
)

if TYPE_CHECKING:
    from tests.services import ThrowawayPostgres

# Automatic analysis of every complete study (the product's default) is switched on by the
# tests that are about it; the others judge the readers' ROIs they post, and only those.
os.environ.setdefault("SPINE_TRIAGE_AUTO_ROI", "off")

POSTGRES_URL = os.environ.get(
    "SPINE_TRIAGE_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database of each kind (a fresh PostgreSQL database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
        return
    yield from _postgres_database()


def _postgres_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    from tests.support import missing_component

    admin = create_engine(f"{POSTGRES_URL}/postgres", isolation_level="AUTOCOMMIT")
    name = f"st_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # reported as a missing component
        admin.dispose()
        missing_component(f"PostgreSQL at {POSTGRES_URL} ({type(exc).__name__})")
    try:
        yield f"{POSTGRES_URL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL server."""
    yield from _postgres_database()


@pytest.fixture
def postgres_url_factory() -> Iterator[Any]:
    """Makes fresh databases on the shared PostgreSQL server; all dropped after the test."""
    generators: list[Iterator[str]] = []

    def make() -> str:
        generator = _postgres_database()
        generators.append(generator)
        return next(generator)

    yield make
    for generator in generators:
        for _ in generator:  # runs the generator's clean-up
            pass


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL server of the test's own, on a free port (may be stopped and restarted)."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.services import ThrowawayPostgres

    folder = Path(tempfile.mkdtemp(prefix="st-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = ThrowawayPostgres(folder / "pg").init()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start real Orthanc instances (own config, storage, ports); stopped after the test."""
    from tests.services import Orthanc

    started: list[Orthanc] = []

    def start(**options: Any) -> Orthanc:
        server = Orthanc(tmp_path_factory.mktemp("orthanc"), **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def throwaway_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Redis server of the test's own (may be restarted, losing its messages)."""
    from tests.services import ThrowawayRedis

    server = ThrowawayRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demonstration model, trained once per test session (a few minutes on a CPU).

    ``SPINE_TRIAGE_TEST_MODEL_CACHE`` names a folder to keep it in between sessions.
    """
    from pathlib import Path

    from model.synthetic.demo import ensure_demo_checkpoint

    cache = os.environ.get("SPINE_TRIAGE_TEST_MODEL_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.mktemp("demo-model")
    return ensure_demo_checkpoint(folder)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's table: scenario, instances, jobs and SRs (when it ran)."""
    from tests.faults.ledger import write_summary

    write_summary(terminalreporter)
