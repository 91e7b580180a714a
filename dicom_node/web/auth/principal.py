"""Who is calling: the :class:`Principal` every authenticated request carries, and the roles.

Roles are permissions: ``reader`` reads the worklist and results, ``annotator`` also submits
ROIs and studies (STOW-RS), ``admin`` also re-sends failed work and manages users and tokens.
A user's role implies the ones below it; a token carries exactly the roles it was made with
(a PACS that only sends studies needs ``annotator`` alone and can read nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

READER = "reader"
ANNOTATOR = "annotator"
ADMIN = "admin"
ROLES = (READER, ANNOTATOR, ADMIN)  # each implies those before it, for users

PrincipalKind = Literal["user", "token", "oidc"]


@dataclass(frozen=True)
class Principal:
    """The caller, once authenticated (``request.state.principal``)."""

    name: str
    kind: PrincipalKind
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles


def implied_roles(role: str) -> frozenset[str]:
    """A user's role and every role below it: admin → {reader, annotator, admin}."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return frozenset(ROLES[: ROLES.index(role) + 1])


def parse_roles(text: str) -> frozenset[str]:
    """Roles as stored (comma-separated); unknown names are dropped, never granted."""
    return frozenset(part for part in (p.strip() for p in text.split(",")) if part in ROLES)


def format_roles(roles: Iterable[str]) -> str:
    chosen = set(roles)
    unknown = chosen - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(sorted(unknown))}: one of {', '.join(ROLES)}")
    if not chosen:
        raise ValueError("at least one role is needed")
    return ",".join(role for role in ROLES if role in chosen)


def highest_role(roles: Iterable[str]) -> str:
    chosen = set(roles)
    return next((role for role in reversed(ROLES) if role in chosen), "")
