from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.migrate import upgrade
from dicom_node.settings import Settings
from dicom_node.web.app import ApiState, create_app

TOKEN = "secret"  # the site's API token (admin role): every read needs a credential


@dataclass
class WorklistService:
    settings: Settings
    sessions: sessionmaker[Session]
    client: TestClient

    @property
    def storage(self) -> Path:
        return self.settings.resolved_storage_dir


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"var_dir": tmp_path / "var", "database_url": database_url}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worklist.db'}"


def _service(tmp_path: Path, url: str) -> Iterator[WorklistService]:
    upgrade(url)
    settings = make_settings(tmp_path, url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    app = create_app(ApiState(settings=settings, sessions=sessions, send=None, token=TOKEN))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield WorklistService(settings, sessions, client)
    engine.dispose()


@pytest.fixture
def service(tmp_path: Path, database_url: str) -> Iterator[WorklistService]:
    """The real app on an empty migrated database of each kind (SQLite, PostgreSQL)."""
    yield from _service(tmp_path, database_url)


@pytest.fixture
def sqlite_service(tmp_path: Path, sqlite_url: str) -> Iterator[WorklistService]:
    """The real app on an empty migrated SQLite database."""
    yield from _service(tmp_path, sqlite_url)
