"""The HTTP service: REST API, STOW-RS, worklist page."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from dicom_node.settings.base import CommaList, SettingsGroup, split_list


class WebSettings(SettingsGroup):
    """Address, TLS and sign-in of the HTTP service."""

    http_host: str = Field("127.0.0.1", description="Address of the REST API and worklist page.")
    http_port: int = Field(8080, ge=1, le=65535, description="Port of the REST API and worklist.")
    api_token: str = Field(
        "",
        description="Bearer token with the admin role, for existing installs and scripts "
        "(tokens per client: `spine-triage tokens create`). Empty: a random token is generated "
        "at start and written to VAR_DIR/api-token (mode 0600).",
    )
    http_tls_certificate: Path | None = Field(
        None,
        description="PEM certificate (chain) of the HTTP service. With HTTP_TLS_PRIVATE_KEY, "
        "the service speaks HTTPS only: plain HTTP is refused, the session cookie is Secure.",
    )
    http_tls_private_key: Path | None = Field(
        None, description="PEM private key of the HTTP service (unencrypted, mode 0600)."
    )
    session_idle_timeout_s: float = Field(
        1800.0, gt=0, description="A signed-in browser session ends after this long unused (s)."
    )
    session_lifetime_s: float = Field(
        43200.0,
        gt=0,
        description="A browser session ends this long after sign-in at the latest (s).",
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        description="Failed sign-ins allowed per account within LOGIN_LOCKOUT_S; then the "
        "account's sign-ins are refused (429, Retry-After) until the window has passed.",
    )
    login_max_failures_per_address: int = Field(
        20, ge=1, description="Failed sign-ins allowed per client address within LOGIN_LOCKOUT_S."
    )
    login_lockout_s: float = Field(
        900.0, gt=0, description="Window over which failed sign-ins are counted (s)."
    )
    oidc_issuer: str = Field(
        "",
        description="Single sign-on: the OpenID Connect issuer whose bearer tokens (JWT) are "
        "accepted (the `iss` claim, exactly). Empty: no OIDC.",
    )
    oidc_audience: str = Field(
        "", description="The `aud` an OIDC token must name (the node's client id at the IdP)."
    )
    oidc_jwks_url: str = Field(
        "",
        description="Where the issuer's signing keys (JWKS) are: an https:// URL, or file:///path "
        "for a key set kept on disk.",
    )
    oidc_roles_claim: str = Field(
        "roles",
        description="Claim holding the caller's groups or roles; a dotted path reaches into "
        "objects (Keycloak: realm_access.roles).",
    )
    oidc_role_map: CommaList = Field(
        default_factory=lambda: ["reader=reader", "annotator=annotator", "admin=admin"],
        description="Comma-separated CLAIM_VALUE=ROLE pairs mapping the IdP's values to the "
        "node's roles (reader, annotator, admin); a token with none of them is refused.",
    )
    oidc_username_claim: str = Field(
        "preferred_username",
        description="Claim naming the caller (falls back to `sub`).",
    )
    oidc_algorithms: CommaList = Field(
        default_factory=lambda: ["RS256", "ES256", "PS256"],
        description="Signature algorithms accepted on OIDC tokens (never `none` or HMAC).",
    )

    @field_validator("oidc_role_map", "oidc_algorithms", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("oidc_role_map")
    @classmethod
    def _valid_role_map(cls, value: list[str]) -> list[str]:
        for pair in value:
            claim_value, _, role = pair.partition("=")
            if not claim_value.strip() or role.strip() not in ("reader", "annotator", "admin"):
                raise ValueError(
                    f"OIDC_ROLE_MAP: {pair!r} is not CLAIM_VALUE=reader|annotator|admin"
                )
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        for name in value:
            if name.lower() == "none" or name.upper().startswith("HS"):
                raise ValueError(f"OIDC_ALGORITHMS: {name} is not allowed (asymmetric only)")
        return value

    @model_validator(mode="after")
    def _http_tls_and_oidc(self) -> Self:
        if (self.http_tls_certificate is None) != (self.http_tls_private_key is None):
            raise ValueError("HTTPS needs both HTTP_TLS_CERTIFICATE and HTTP_TLS_PRIVATE_KEY")
        if self.oidc_issuer and not (self.oidc_audience and self.oidc_jwks_url):
            raise ValueError("OIDC_ISSUER needs OIDC_AUDIENCE and OIDC_JWKS_URL")
        return self

    @property
    def http_tls_enabled(self) -> bool:
        return self.http_tls_certificate is not None

    @property
    def oidc_roles(self) -> dict[str, str]:
        """The role map as {claim value: role}."""
        pairs = (pair.partition("=") for pair in self.oidc_role_map)
        return {value.strip(): role.strip() for value, _, role in pairs}
