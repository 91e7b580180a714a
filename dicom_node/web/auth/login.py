"""Signing in and out of the worklist page: ``GET/POST /login``, ``POST /logout``,
``GET /session`` (who is signed in, and the CSRF token the page sends with writes).

A sign-in sets the session cookie: HttpOnly, SameSite=Strict, Secure over HTTPS, Path=/;
only its sha256 is stored. Failed sign-ins are counted per account and per client address
(:class:`LoginThrottle`); past the limit, sign-ins are answered 429 with Retry-After, right
password or not, until the window has passed. Passwords are never logged, nor user names of
failed attempts (they are often a password typed in the wrong box).
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import audit
from dicom_node.archive.db import transaction
from dicom_node.web.auth import accounts
from dicom_node.web.auth.guard import (
    LOGIN_PATH,
    SESSION_COOKIE,
    Authentication,
    Authenticator,
    principal_of,
    same_origin,
)

log = logging.getLogger(__name__)

LOGIN_PAGE = Path(__file__).parent.parent / "static" / "login.html"
LOGIN_PAGE_POLICY = (
    "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
_MAX_TRACKED = 10_000  # accounts and addresses remembered at once (oldest dropped first)


class LoginThrottle:
    """Failed sign-ins in a sliding window, per account and per client address."""

    def __init__(self, per_account: int, per_address: int, window_s: float) -> None:
        self.limits = {"account": per_account, "address": per_address}
        self.window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str) -> list[tuple[str, str]]:
        return [("account", username.casefold()), ("address", address)]

    def retry_after(self, username: str, address: str, now: float | None = None) -> float:
        """Seconds until a sign-in may be tried again (0: now)."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for key in self._keys(username, address):
                failures = self._failures.get(key)
                if not failures:
                    continue
                while failures and failures[0] <= now - self.window_s:
                    failures.popleft()
                if len(failures) >= self.limits[key[0]]:
                    wait = max(wait, failures[0] + self.window_s - now)
        return wait

    def failed(self, username: str, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in self._keys(username, address):
                self._failures.setdefault(key, deque()).append(now)
            while len(self._failures) > _MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(("account", username.casefold()), None)


def _login_page(message: str = "", status_code: int = 200) -> HTMLResponse:
    text = LOGIN_PAGE.read_text()
    if message:
        text = text.replace(
            "<!--message-->", f'<p class="login-error" role="alert">{html.escape(message)}</p>'
        )
    return HTMLResponse(
        text,
        status_code=status_code,
        headers={"Content-Security-Policy": LOGIN_PAGE_POLICY, "Cache-Control": "no-store"},
    )


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def register_login(app: FastAPI, authenticator: Authenticator) -> None:
    settings = authenticator.settings
    throttle = LoginThrottle(
        settings.login_max_failures,
        settings.login_max_failures_per_address,
        settings.login_lockout_s,
    )
    app.state.login_throttle = throttle

    @app.get(LOGIN_PATH, include_in_schema=False)
    def get_login() -> HTMLResponse:
        return _login_page()

    @app.post(
        LOGIN_PATH,
        summary="Sign in (form: username, password); sets the session cookie",
        response_class=HTMLResponse,
        status_code=status.HTTP_303_SEE_OTHER,
        responses={
            401: {"description": "wrong user or password"},
            429: {"description": "too many failures"},
        },
    )
    def post_login(
        request: Request,
        # No length limits here: a 422 would echo the field back; too long is simply wrong.
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
    ) -> Response:
        username = username[:128]
        if not same_origin(request):
            return _login_page("This sign-in came from another site.", status.HTTP_403_FORBIDDEN)
        address = client_address(request)
        wait = throttle.retry_after(username, address)
        if wait > 0:
            log.warning("sign-in refused: too many failures (from %s)", address)
            audit.user_authentication(request, user=username, success=False)
            response = _login_page(
                "Too many failed sign-ins: try again later.", status.HTTP_429_TOO_MANY_REQUESTS
            )
            response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
            return response
        now = datetime.now(UTC)
        try:
            with transaction(authenticator.sessions) as session:
                verified = accounts.verify_password(session, username, password)
                opened = (
                    accounts.open_session(
                        session,
                        verified[0],
                        now=now,
                        idle_s=settings.session_idle_timeout_s,
                        lifetime_s=settings.session_lifetime_s,
                    )
                    if verified
                    else None
                )
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable, retry later") from exc
        if verified is None or opened is None:
            throttle.failed(username, address)
            audit.user_authentication(request, user=username, success=False, description="refused")
            log.info("sign-in failed (from %s)", address)
            return _login_page("Wrong user name or password.", status.HTTP_401_UNAUTHORIZED)
        throttle.succeeded(username)
        audit.user_authentication(request, user=verified[1].name, success=True)
        log.info("signed in: %s (from %s)", verified[1].name, address)
        signed_in = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
        signed_in.set_cookie(
            SESSION_COOKIE,
            opened.cookie,
            max_age=int(settings.session_lifetime_s),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return signed_in

    @app.post(
        "/logout",
        summary="Sign out: the session ends (a write: the page sends its X-CSRF-Token)",
        status_code=status.HTTP_204_NO_CONTENT,
    )
    def post_logout(request: Request) -> Response:
        principal_of(request)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            with transaction(authenticator.sessions) as session:
                accounts.close_session(session, cookie)
        audit.user_authentication(request, user=audit.caller(request), success=True, logout=True)
        response = Response(status_code=status.HTTP_204_NO_CONTENT)
        response.delete_cookie(
            SESSION_COOKIE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.get("/session", summary="Who is calling: name, kind, roles (and the page's CSRF token)")
    def get_session(request: Request) -> dict[str, Any]:
        principal = principal_of(request)
        outcome: Authentication | None = getattr(request.state, "authentication", None)
        expires = outcome.session_expires_at if outcome else None
        return {
            "name": principal.name,
            "kind": principal.kind,
            "roles": sorted(principal.roles),
            "csrf_token": outcome.csrf_token if outcome and outcome.by_cookie else None,
            "expires_at": expires.isoformat() if expires else None,
        }
