"""The real HTTP app on a migrated database with one study of a named patient, a user of each
role, and API tokens; what the sign-in tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AnnotationState, DeliveryState
from dicom_node.settings import Settings
from dicom_node.web.app import ApiState, create_app
from dicom_node.web.auth import ADMIN, ANNOTATOR, READER, accounts
from tests.worklist.rows import Seeder

PATIENT_NAME = "WALKER^SECRETA"
PATIENT_ID = "PHI-4711"
LEGACY_TOKEN = "the-sites-api-token"
PASSWORDS = {role: f"{role} password 123" for role in (READER, ANNOTATOR, ADMIN)}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@dataclass
class Node:
    """The app, its database and what is in it."""

    settings: Settings
    sessions: sessionmaker[Session]
    app: FastAPI
    study_uid: str
    result_id: int
    annotation_id: int
    failed_annotation_id: int
    delivery_id: int
    tokens: dict[str, str] = field(default_factory=dict)  # name -> secret
    clients: list[TestClient] = field(default_factory=list)

    def client(self, token: str | None = None, **options: Any) -> TestClient:
        """A client of the app (``base_url`` http://testserver), with a bearer token or none."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = TestClient(self.app, headers=headers, follow_redirects=False, **options)
        client.__enter__()
        self.clients.append(client)
        return client

    def signed_in(self, role: str) -> tuple[TestClient, str]:
        """A browser-like client signed in as the user of ``role``, and its CSRF token."""
        client = self.client()
        answer = client.post("/login", data={"username": role, "password": PASSWORDS[role]})
        assert answer.status_code == 303, answer.text
        csrf = client.get("/session").json()["csrf_token"]
        assert csrf
        return client, csrf

    def token(self, name: str, *roles: str) -> str:
        """A new API token's secret."""
        return self.token_with_id(name, *roles)[1]

    def token_with_id(self, name: str, *roles: str) -> tuple[int, str]:
        with transaction(self.sessions) as session:
            view, secret = accounts.create_token(
                session, name, roles, created_by="test", now=datetime.now(UTC)
            )
        self.tokens[name] = secret
        return view.id, secret


def make_node(tmp_path: Path, database_url: str, **overrides: Any) -> Iterator[Node]:
    upgrade(database_url)
    values: dict[str, Any] = {"var_dir": tmp_path / "var", "database_url": database_url}
    values.update(overrides)
    settings = Settings(_env_file=None, **values)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    storage = settings.resolved_storage_dir
    (storage / "previews").mkdir(parents=True, exist_ok=True)
    (storage / "previews" / "p.png").write_bytes(PNG)
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        seed = Seeder(session)
        study = seed.study(name=PATIENT_NAME, patient_id=PATIENT_ID, accession="ACC4711")
        annotation = seed.annotation(study, state=AnnotationState.DONE)
        result = seed.result(annotation, (0.2, 0.9, 0.4), preview_path="previews/p.png")
        failed = seed.annotation(study, state=AnnotationState.FAILED, failure_reason="test")
        delivery = seed.delivery(result, "pacs", DeliveryState.FAILED, last_error="refused")
        for role, password in PASSWORDS.items():
            accounts.add_user(session, role, password, role, now=now)
    app = create_app(ApiState(settings=settings, sessions=sessions, send=None, token=LEGACY_TOKEN))
    node = Node(settings, sessions, app, study, result, annotation, failed, delivery)
    try:
        yield node
    finally:
        for client in node.clients:
            client.__exit__(None, None, None)
        engine.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """The app on SQLite."""
    yield from make_node(tmp_path, f"sqlite:///{tmp_path / 'signin.db'}")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """The app on SQLite with settings of the test's choosing."""
    made: list[Iterator[Node]] = []

    def make(**overrides: Any) -> Node:
        folder = tmp_path / f"node{len(made)}"
        folder.mkdir()
        nodes = make_node(folder, f"sqlite:///{folder / 'signin.db'}", **overrides)
        made.append(nodes)
        return next(nodes)

    yield make
    for nodes in made:
        next(nodes, None)
