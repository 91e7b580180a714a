"""The one place that decides whether a request is authenticated, and as whom.

Every request but the public ones (:data:`PUBLIC_PATHS`: health, metrics, the sign-in page
and the page's static files, the OpenAPI schema) needs a credential, checked in a middleware
before anything reads the body:

- ``Authorization: Bearer <token>``: an API token made by ``spine-triage tokens create``, the
  site's SPINE_TRIAGE_API_TOKEN (or embedded mode's VAR_DIR/api-token) with the admin role,
  or, when OIDC is configured, the site's single sign-on token (a JWT);
- the session cookie of a signed-in browser; a write with it also needs the session's CSRF
  token in the ``X-CSRF-Token`` header and, when the browser sends one, a same-origin
  ``Origin``.

Without one, the page (``/``) redirects to the sign-in page and the API answers 401. The
caller is then ``request.state.principal`` (:class:`Principal`); each route states the role
it needs with :func:`requires` (403 without it).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from dicom_node import audit
from dicom_node.archive.db import transaction
from dicom_node.settings import Settings
from dicom_node.web.auth import accounts
from dicom_node.web.auth.oidc import OidcRefused, OidcVerifier, looks_like_jwt
from dicom_node.web.auth.principal import Principal

log = logging.getLogger(__name__)

SESSION_COOKIE = "spine_triage_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATH = "/login"
PUBLIC_PATHS = frozenset(
    {"/health", "/metrics", LOGIN_PATH, "/openapi.json", "/docs", "/docs/oauth2-redirect"}
)
PUBLIC_PREFIXES = ("/static/",)  # the page's script and style sheet: code, no patient data
PAGE_PATHS = frozenset({"/"})  # HTML: a browser without a session is sent to sign in


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass(frozen=True)
class Authentication:
    """What :meth:`Authenticator.authenticate` decided: a principal, or why not."""

    principal: Principal | None
    refusal: str = ""
    status: int = status.HTTP_401_UNAUTHORIZED
    by_cookie: bool = False
    csrf_token: str = ""
    session_expires_at: datetime | None = None


class Authenticator:
    """Checks a request's credential against the users, sessions and tokens of the database,
    the site's legacy API token and, when configured, the OIDC issuer's keys."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], legacy_token: str
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.legacy_token = legacy_token
        self.oidc = OidcVerifier(settings) if settings.oidc_issuer else None

    def authenticate(self, request: Request, now: datetime | None = None) -> Authentication:
        now = now or datetime.now(UTC)
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        try:
            if scheme:
                if scheme.lower() != "bearer" or not credential:
                    return Authentication(None, "only the Bearer scheme is accepted")
                return self._bearer(credential, now)
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie:
                return self._cookie(cookie, now)
        except SQLAlchemyError as exc:
            log.warning("sign-in check: database unavailable (%s)", type(exc).__name__)
            return Authentication(None, "database unavailable, retry later", status=503)
        return Authentication(None, "sign-in required: a bearer token or a session")

    def _bearer(self, credential: str, now: datetime) -> Authentication:
        if self.oidc is not None and looks_like_jwt(credential):
            try:
                return Authentication(self.oidc.verify(credential))
            except OidcRefused as exc:
                log.info("OIDC token refused: %s", exc.reason)
                return Authentication(None, exc.reason, status=exc.status)
        if self.legacy_token and hmac.compare_digest(
            credential.encode(), self.legacy_token.encode()
        ):
            return Authentication(accounts.LEGACY_TOKEN_PRINCIPAL)
        with transaction(self.sessions) as session:
            principal = accounts.use_token(session, credential, now=now)
        if principal is None:
            log.info("bearer token refused (unknown or revoked)")
            return Authentication(None, "the bearer token is not valid (unknown or revoked)")
        return Authentication(principal)

    def _cookie(self, cookie: str, now: datetime) -> Authentication:
        with transaction(self.sessions) as session:
            resumed = accounts.resume_session(
                session,
                cookie,
                now=now,
                idle_s=self.settings.session_idle_timeout_s,
                lifetime_s=self.settings.session_lifetime_s,
            )
        if resumed is None:
            return Authentication(None, "the session has ended: sign in again")
        return Authentication(
            resumed.principal,
            by_cookie=True,
            csrf_token=resumed.csrf_token,
            session_expires_at=resumed.expires_at,
        )


def same_origin(request: Request) -> bool:
    """True unless the browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"{request.url.scheme}://{host}",)


def _csrf_ok(request: Request, expected: str) -> bool:
    given = request.headers.get(CSRF_HEADER, "")
    return (
        bool(given)
        and hmac.compare_digest(given.encode(), expected.encode())
        and same_origin(request)
    )


def _refuse(request: Request, outcome: Authentication) -> Response:
    if request.url.path in PAGE_PATHS and request.method in SAFE_METHODS:
        return RedirectResponse(LOGIN_PATH, status_code=status.HTTP_303_SEE_OTHER)
    headers = {}
    if outcome.status == status.HTTP_401_UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": outcome.refusal}, status_code=outcome.status, headers=headers)


def install_guard(app: FastAPI, authenticator: Authenticator) -> None:
    """Put the sign-in check in front of every route of ``app``."""
    app.state.authenticator = authenticator

    @app.middleware("http")
    async def _sign_in_required(request: Request, call_next: Callable[..., Any]) -> Any:
        if is_public(request.url.path):
            return await call_next(request)
        outcome = await run_in_threadpool(authenticator.authenticate, request)
        if outcome.principal is None:
            await run_in_threadpool(audit.credential_refused, request, outcome.refusal)
            return _refuse(request, outcome)
        if (
            outcome.by_cookie
            and request.method not in SAFE_METHODS
            and not _csrf_ok(request, outcome.csrf_token)
        ):
            await run_in_threadpool(audit.security_alert, request, description="CSRF refused")
            return JSONResponse(
                {"detail": f"a write from the page needs its {CSRF_HEADER} header"},
                status_code=status.HTTP_403_FORBIDDEN,
            )
        request.state.principal = outcome.principal
        request.state.authentication = outcome
        return await call_next(request)


# The schemes, for the OpenAPI schema (the middleware has checked them already).
_BEARER = HTTPBearer(auto_error=False, description="API token or OIDC access token")
_COOKIE = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="signed-in browser")


def principal_of(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "sign-in required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def requires(role: str) -> Any:
    """A route dependency: the caller must hold ``role`` (403 otherwise)."""

    def check(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        _cookie: Annotated[str | None, Depends(_COOKIE)],
    ) -> Principal:
        principal = principal_of(request)
        if not principal.has(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"the {role} role is needed")
        return principal

    return Depends(check)
