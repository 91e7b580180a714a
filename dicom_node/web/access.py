"""Who may do what on the HTTP service, and the state every route reads.

Every write needs ``Authorization: Bearer <token>`` (SPINE_TRIAGE_API_TOKEN; in embedded mode
a random token is made on first start and kept in VAR_DIR/api-token). The check runs in a
middleware before anything reads the body, and again as a route dependency so the OpenAPI
schema documents the scheme.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Header, HTTPException, Request, status
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.broker.wake import SendTask
from dicom_node.dicom.ingest import StoreContext
from dicom_node.settings import Settings

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def token_matches(authorization: str | None, expected: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Documents the bearer scheme in the OpenAPI schema (the middleware enforces it first)."""
    if not token_matches(authorization, api_state(request).token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required for writes",
            headers={"WWW-Authenticate": "Bearer"},
        )
