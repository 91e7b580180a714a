"""The state every route of the HTTP service reads, and the site's own API token.

Who may call which route is :mod:`dicom_node.web.auth`'s: the site's token
(SPINE_TRIAGE_API_TOKEN; in embedded mode a random token made on first start and kept in
VAR_DIR/api-token) is one API token with the admin role.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.broker.wake import SendTask
from dicom_node.dicom.ingest import StoreContext
from dicom_node.settings import Settings


@dataclass
class ApiState:
    settings: Settings
    sessions: sessionmaker[Session]
    send: SendTask | None
    token: str
    store_context: StoreContext | None = None


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


def api_token(settings: Settings) -> str:
    """The configured token, or the embedded mode's generated one (made once, kept)."""
    if settings.api_token:
        return settings.api_token
    path = settings.var_dir / "api-token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token
