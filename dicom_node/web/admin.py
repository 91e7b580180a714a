"""Administration over HTTP (the admin role): re-send failed work, list users, make and
revoke API tokens. The same as ``spine-triage deliveries retry``, ``annotations retry``,
``users list`` and ``tokens create/list/revoke``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import Delivery
from dicom_node.web.access import api_state
from dicom_node.web.auth import ADMIN, READER, ROLES, Principal, accounts, requires

_ADMIN = requires(ADMIN)


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=64, description="Who uses it, e.g. pacs-stow or qa-script")
    roles: list[str] = Field(min_length=1, description=f"Some of {', '.join(ROLES)}")

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}: one of {', '.join(ROLES)}")
        return value


def _token_json(view: accounts.TokenView) -> dict[str, Any]:
    return {
        "id": view.id,
        "name": view.name,
        "roles": sorted(view.roles),
        "created_by": view.created_by,
        "created_at": view.created_at.isoformat(),
        "revoked_at": view.revoked_at.isoformat() if view.revoked_at else None,
        "last_used_at": view.last_used_at.isoformat() if view.last_used_at else None,
    }


def register_admin(app: FastAPI) -> None:
    @app.get("/deliveries", dependencies=[requires(READER)], summary="Result deliveries")
    def list_deliveries(
        request: Request, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        with api_state(request).sessions() as session:
            query = select(Delivery).order_by(Delivery.id.desc()).limit(min(limit, 1000))
            if state:
                query = query.where(Delivery.state == state)
            return [
                {
                    "id": delivery.id,
                    "result_id": delivery.result_id,
                    "destination": delivery.destination,
                    "kind": delivery.kind,
                    "state": delivery.state.value,
                    "attempts": delivery.attempts,
                    "last_error": delivery.last_error,
                }
                for delivery in session.scalars(query)
            ]

    @app.post(
        "/deliveries/{delivery_id}/retry",
        dependencies=[_ADMIN],
        summary="Re-send a failed delivery (admin)",
    )
    def retry_delivery(delivery_id: int, request: Request) -> dict[str, Any]:
        with transaction(api_state(request).sessions) as session:
            ids = lifecycle.retry_failed_deliveries(session, [delivery_id], now=datetime.now(UTC))
        if not ids:
            raise HTTPException(status.HTTP_409_CONFLICT, "no failed delivery with this id")
        return {"requeued": ids}

    @app.post(
        "/annotations/{annotation_id}/retry",
        dependencies=[_ADMIN],
        summary="Run a failed triage job again (admin)",
    )
    def retry_annotation(annotation_id: int, request: Request) -> dict[str, Any]:
        with transaction(api_state(request).sessions) as session:
            ids = lifecycle.retry_failed_annotations(
                session, [annotation_id], now=datetime.now(UTC)
            )
        if not ids:
            raise HTTPException(status.HTTP_409_CONFLICT, "no failed annotation with this id")
        return {"requeued": ids}

    @app.get("/admin/users", dependencies=[_ADMIN], summary="Users and their roles (admin)")
    def list_users(request: Request) -> list[dict[str, Any]]:
        with api_state(request).sessions() as session:
            users = accounts.list_users(session, now=datetime.now(UTC))
        return [
            {
                "username": user.username,
                "roles": sorted(user.roles),
                "disabled": user.disabled,
                "created_at": user.created_at.isoformat(),
                "password_changed_at": user.password_changed_at.isoformat(),
                "open_sessions": user.sessions,
            }
            for user in users
        ]

    @app.get("/admin/tokens", dependencies=[_ADMIN], summary="API tokens, without secrets (admin)")
    def list_tokens(request: Request) -> list[dict[str, Any]]:
        with api_state(request).sessions() as session:
            return [_token_json(view) for view in accounts.list_tokens(session)]

    @app.post(
        "/admin/tokens",
        status_code=status.HTTP_201_CREATED,
        summary="Make an API token for a client; its secret is in this answer only (admin)",
    )
    def create_token(
        body: TokenIn, request: Request, principal: Annotated[Principal, _ADMIN]
    ) -> dict[str, Any]:
        try:
            with transaction(api_state(request).sessions) as session:
                view, secret = accounts.create_token(
                    session,
                    body.name,
                    body.roles,
                    created_by=f"{principal.kind}:{principal.name}"[:64],
                    now=datetime.now(UTC),
                )
        except accounts.AccountError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return {**_token_json(view), "token": secret}

    @app.delete(
        "/admin/tokens/{token_id}",
        dependencies=[_ADMIN],
        summary="Revoke an API token: refused from its next request on (admin)",
    )
    def revoke_token(token_id: int, request: Request) -> dict[str, Any]:
        try:
            with transaction(api_state(request).sessions) as session:
                view = accounts.revoke_token(session, token_id, now=datetime.now(UTC))
        except accounts.AccountError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        return _token_json(view)
