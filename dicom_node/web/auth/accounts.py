"""Users, browser sessions and API tokens in the database: the one module that writes them.

Passwords are kept as Argon2id hashes (argon2-cffi's defaults, RFC 9106), a session cookie
and an API token only as the sha256 of their 256 random bits: a copy of the database opens
no session and calls no API. Disabling a user or changing a password ends the user's
sessions; revoking a token takes effect on its next request.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.archive.schema import ApiToken, WebSession, WebUser
from dicom_node.web.auth.principal import (
    ROLES,
    Principal,
    format_roles,
    implied_roles,
    parse_roles,
)

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@ -]{0,63}$")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
TOKEN_PREFIX = "st_"
# last_seen_at / last_used_at are written at most this often (a write per request otherwise).
_TOUCH_EVERY = timedelta(seconds=60)


class AccountError(ValueError):
    """A request about an account that cannot be carried out (the message says why)."""


@cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()


@cache
def _dummy_hash() -> str:
    # Verified against when the user does not exist, so both cases take as long.
    return _hasher().hash(secrets.token_urlsafe(16))


def digest(secret: str) -> str:
    """The stored form of a session cookie or an API token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")


# --- users ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserView:
    username: str
    roles: frozenset[str]
    disabled: bool
    created_at: datetime
    password_changed_at: datetime
    sessions: int


def add_user(session: Session, username: str, password: str, role: str, *, now: datetime) -> int:
    """A new user with ``role`` (and the roles below it); its id."""
    if not USERNAME.match(username):
        raise AccountError(
            "a user name is 1-64 letters, digits or . _ @ -, starting with a letter or digit"
        )
    check_password_rules(password)
    roles = format_roles(implied_roles(role))
    if session.scalar(select(WebUser.id).where(WebUser.username == username)) is not None:
        raise AccountError(f"user {username} exists already")
    user = WebUser(
        username=username,
        password_hash=_hasher().hash(password),
        roles=roles,
        disabled=False,
        created_at=now,
        password_changed_at=now,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise AccountError(f"user {username} exists already") from exc
    return user.id


def _user(session: Session, username: str) -> WebUser:
    user = session.scalar(select(WebUser).where(WebUser.username == username))
    if user is None:
        raise AccountError(f"no user {username}")
    return user


def set_password(session: Session, username: str, password: str, *, now: datetime) -> None:
    """A new password; the user's open sessions end."""
    check_password_rules(password)
    user = _user(session, username)
    user.password_hash = _hasher().hash(password)
    user.password_changed_at = now
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))


def set_role(session: Session, username: str, role: str) -> None:
    user = _user(session, username)
    user.roles = format_roles(implied_roles(role))
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))


def set_disabled(session: Session, username: str, disabled: bool) -> None:
    """Disable (its sessions end at once) or enable a user."""
    user = _user(session, username)
    user.disabled = disabled
    if disabled:
        session.execute(delete(WebSession).where(WebSession.user_id == user.id))


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count(WebUser.id))) or 0)


def list_users(session: Session, *, now: datetime) -> list[UserView]:
    users = session.scalars(select(WebUser).order_by(WebUser.username)).all()
    open_sessions: dict[int, int] = {}
    for user_id in session.scalars(select(WebSession.user_id).where(WebSession.expires_at > now)):
        open_sessions[user_id] = open_sessions.get(user_id, 0) + 1
    return [
        UserView(
            username=user.username,
            roles=parse_roles(user.roles),
            disabled=user.disabled,
            created_at=user.created_at,
            password_changed_at=user.password_changed_at,
            sessions=open_sessions.get(user.id, 0),
        )
        for user in users
    ]


def verify_password(session: Session, username: str, password: str) -> tuple[int, Principal] | None:
    """The user's id and principal when the password is right and the user enabled; the
    hash is upgraded in place when argon2's parameters have changed since it was made."""
    user = session.scalar(select(WebUser).where(WebUser.username == username))
    if user is None or len(password) > MAX_PASSWORD_LENGTH:
        with contextlib.suppress(VerificationError):
            _hasher().verify(_dummy_hash(), password[:MAX_PASSWORD_LENGTH])
        return None
    try:
        _hasher().verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if user.disabled:
        return None
    if _hasher().check_needs_rehash(user.password_hash):
        user.password_hash = _hasher().hash(password)
    return user.id, Principal(user.username, "user", parse_roles(user.roles))


# --- browser sessions -----------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedSession:
    cookie: str  # the secret the browser keeps; only its sha256 is stored
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True)
class ResumedSession:
    principal: Principal
    csrf_token: str
    expires_at: datetime


def open_session(
    session: Session, user_id: int, *, now: datetime, idle_s: float, lifetime_s: float
) -> OpenedSession:
    cookie = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    expires_at = min(now + timedelta(seconds=idle_s), now + timedelta(seconds=lifetime_s))
    session.add(
        WebSession(
            session_sha256=digest(cookie),
            user_id=user_id,
            csrf_token=csrf_token,
            created_at=now,
            last_seen_at=now,
            expires_at=expires_at,
        )
    )
    # Expired sessions of anyone go now: the table holds open sessions only.
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    return OpenedSession(cookie, csrf_token, expires_at)


def resume_session(
    session: Session, cookie: str, *, now: datetime, idle_s: float, lifetime_s: float
) -> ResumedSession | None:
    """The signed-in user of a cookie, or None (unknown, expired, user disabled). A used
    session's idle expiry moves on (within the absolute lifetime)."""
    row = session.execute(
        select(WebSession, WebUser)
        .join(WebUser, WebUser.id == WebSession.user_id)
        .where(WebSession.session_sha256 == digest(cookie))
    ).one_or_none()
    if row is None:
        return None
    web_session, user = row
    if now >= web_session.expires_at or user.disabled:
        session.delete(web_session)
        return None
    touch_every = min(_TOUCH_EVERY, timedelta(seconds=idle_s / 10))
    if now - web_session.last_seen_at >= touch_every:
        web_session.last_seen_at = now
        web_session.expires_at = min(
            now + timedelta(seconds=idle_s),
            web_session.created_at + timedelta(seconds=lifetime_s),
        )
    principal = Principal(user.username, "user", parse_roles(user.roles))
    return ResumedSession(principal, web_session.csrf_token, web_session.expires_at)


def close_session(session: Session, cookie: str) -> None:
    session.execute(delete(WebSession).where(WebSession.session_sha256 == digest(cookie)))


# --- API tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenView:
    id: int
    name: str
    roles: frozenset[str]
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def _view(token: ApiToken) -> TokenView:
    return TokenView(
        id=token.id,
        name=token.name,
        roles=parse_roles(token.roles),
        created_by=token.created_by,
        created_at=token.created_at,
        revoked_at=token.revoked_at,
        last_used_at=token.last_used_at,
    )


def create_token(
    session: Session, name: str, roles: Iterable[str], *, created_by: str | None, now: datetime
) -> tuple[TokenView, str]:
    """A new token for a client: its view and the secret, which is shown this once."""
    if not TOKEN_NAME.match(name):
        raise AccountError("a token name is 1-64 letters, digits, spaces or . _ @ -")
    stored_roles = format_roles(roles)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise AccountError(f"a token named {name!r} exists already (revoked ones keep their name)")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        token_sha256=digest(secret),
        roles=stored_roles,
        created_by=created_by,
        created_at=now,
    )
    session.add(token)
    try:
        session.flush()
    except IntegrityError as exc:
        raise AccountError(f"a token named {name!r} exists already") from exc
    return _view(token), secret


def list_tokens(session: Session) -> list[TokenView]:
    return [_view(token) for token in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(session: Session, name_or_id: str | int, *, now: datetime) -> TokenView:
    """Revoke a token (by name or id); refused from its next request on."""
    query = select(ApiToken)
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        query = query.where(ApiToken.id == int(name_or_id))
    else:
        query = query.where(ApiToken.name == name_or_id)
    token = session.scalar(query)
    if token is None:
        raise AccountError(f"no token {name_or_id}")
    if token.revoked_at is None:
        token.revoked_at = now
    return _view(token)


def use_token(session: Session, secret: str, *, now: datetime) -> Principal | None:
    """The principal of a valid, unrevoked token (its last use recorded), or None."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    token = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest(secret)))
    if token is None or token.revoked_at is not None:
        return None
    if token.last_used_at is None or now - token.last_used_at >= _TOUCH_EVERY:
        token.last_used_at = now
    return Principal(token.name, "token", parse_roles(token.roles))


LEGACY_TOKEN_PRINCIPAL = Principal("api-token", "token", frozenset(ROLES))
