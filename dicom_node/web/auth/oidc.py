"""Single sign-on: OIDC bearer tokens (JWT) verified against the site's key set (JWKS).

The signature is checked with the issuer's published key (PyJWT's :class:`PyJWKClient`,
which caches the key set and fetches it again when a token names a key it does not know),
with asymmetric algorithms only; ``iss``, ``aud`` and ``exp`` are required and checked. The
caller's roles come from a configurable claim, mapped to the node's roles; a token that maps
to none is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import jwt

from dicom_node.settings import Settings
from dicom_node.web.auth.principal import Principal, implied_roles

log = logging.getLogger(__name__)

CLOCK_SKEW_S = 30


class OidcRefused(Exception):
    """The token is not accepted; ``status`` is 401 (not valid) or 403 (valid, no role)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class SigningKeys(Protocol):
    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK: ...


class FileKeys:
    """A key set kept on disk (``file:///path``), read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: jwt.PyJWKSet | None = None

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK:
        kid = jwt.get_unverified_header(token).get("kid")
        try:
            stat = self.path.stat()
            if self._keys is None or self._stamp != (stat.st_mtime_ns, stat.st_size):
                self._keys = jwt.PyJWKSet.from_json(self.path.read_text())
                self._stamp = (stat.st_mtime_ns, stat.st_size)
        except (OSError, jwt.PyJWTError) as exc:
            raise jwt.PyJWKClientConnectionError(f"key set file: {exc}") from exc
        for key in self._keys.keys:
            if key.key_id == kid:
                return key
        raise jwt.PyJWKClientError(f"no key {kid!r} in the key set")


def signing_keys(url: str) -> SigningKeys:
    """The issuer's keys: fetched over HTTP(S) and cached, or read from a file."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileKeys(Path(unquote(parsed.path)))
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)


class OidcVerifier:
    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.algorithms = list(settings.oidc_algorithms)
        self.roles_claim = settings.oidc_roles_claim
        self.username_claim = settings.oidc_username_claim
        self.role_map = settings.oidc_roles
        self.keys = signing_keys(settings.oidc_jwks_url)

    def verify(self, token: str) -> Principal:
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=CLOCK_SKEW_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("OIDC: the key set could not be fetched (%s)", type(exc).__name__)
            raise OidcRefused("the identity provider's keys are unavailable") from exc
        except jwt.PyJWTError as exc:
            raise OidcRefused(f"token refused ({type(exc).__name__})") from exc
        values = _claim(claims, self.roles_claim)
        if isinstance(values, str):
            values = [values]
        roles: set[str] = set()
        for value in values if isinstance(values, list) else []:
            role = self.role_map.get(str(value))
            if role:
                roles |= implied_roles(role)
        if not roles:
            raise OidcRefused("the token grants none of this node's roles", status=403)
        name = claims.get(self.username_claim) or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise OidcRefused("the token names no user (no sub)")
        return Principal(name[:256], "oidc", frozenset(roles))
