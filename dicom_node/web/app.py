"""The node's HTTP service: REST API, STOW-RS ingest, worklist, health and metrics (FastAPI).

Every route but health, metrics and the sign-in page needs a signed-in browser or a bearer
token, and the role the route names (:mod:`dicom_node.web.auth`). HTTPS when the settings
name a certificate and key. OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.schema import Study
from dicom_node.audit import AuditTrail
from dicom_node.broker.wake import SendTask
from dicom_node.dicom.ingest import StoreContext
from dicom_node.settings import Settings
from dicom_node.web.access import ApiState, api_state, api_token
from dicom_node.web.admin import register_admin
from dicom_node.web.annotations import register_annotations
from dicom_node.web.auth import READER, Authenticator, install_guard, requires
from dicom_node.web.auth.login import register_login
from dicom_node.web.metrics import register_metrics
from dicom_node.web.stow import register_stow
from dicom_node.web.worklist import register_worklist

log = logging.getLogger(__name__)


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    return value


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(
        title="spine-triage",
        summary="Computer-aided triage of spine CT: flags likely malignant vertebral fractures "
        "for priority reading. Not a diagnosis.",
        version="0.1.0",
    )
    app.state.api = state
    # Before anything reads the body: a caller without a credential learns nothing else.
    authenticator = Authenticator(state.settings, state.sessions, state.token)
    install_guard(app, authenticator)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # JSON allows NaN/Infinity into Python; they cannot be echoed back as JSON.
        detail = _finite_json(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get(
        "/studies",
        dependencies=[requires(READER)],
        summary="Studies received, newest first (no patient data)",
    )
    def list_studies(request: Request, limit: int = 100) -> list[dict[str, Any]]:
        with api_state(request).sessions() as session:
            studies = session.scalars(
                select(Study).order_by(Study.last_received_at.desc()).limit(limit)
            )
            return [
                {
                    "study_instance_uid": study.study_instance_uid,
                    "state": study.state.value,
                    "instances": study.instance_count,
                    "last_received_at": study.last_received_at.isoformat(),
                    "completed_at": study.completed_at.isoformat() if study.completed_at else None,
                }
                for study in studies
            ]

    @app.get("/health", summary="Database and broker reachability")
    def health(request: Request, response: Response) -> dict[str, Any]:
        api = api_state(request)
        checks = {"database": _check_database(api), "broker": _check_broker(api.settings)}
        healthy = all(value == "ok" for value in checks.values())
        if not healthy:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "ok" if healthy else "unavailable", **checks}

    register_login(app, authenticator)
    register_annotations(app)
    register_admin(app)
    register_stow(app)
    register_worklist(app)
    register_metrics(app)
    return app


def _check_database(api: ApiState) -> str:
    try:
        with api.sessions() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except SQLAlchemyError as exc:
        return f"unavailable ({type(exc).__name__})"


def _check_broker(settings: Settings) -> str:
    if settings.is_embedded:
        folder = settings.broker_folder / "queue"
        return "ok" if folder.is_dir() else "unavailable (broker folder missing)"

    try:
        with Connection(settings.resolved_broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # any broker failure is reported, not raised
        return f"unavailable ({type(exc).__name__})"


class HttpServer:
    """uvicorn in a background thread; HTTPS only when given a certificate and key."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        tls_certificate: Path | None = None,
        tls_private_key: Path | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(tls_certificate) if tls_certificate else None,
            ssl_keyfile=str(tls_private_key) if tls_private_key else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self) -> HttpServer:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)
        if not self.server.started:
            raise RuntimeError("the HTTP service could not start (is the port in use?)")
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("not started")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_http(
    settings: Settings,
    sessions: sessionmaker[Session],
    send: SendTask | None,
    *,
    store_context: StoreContext | None = None,
    audit: AuditTrail | None = None,
) -> HttpServer:
    """Serve the app; its reads and refusals are audited to ``audit`` (the node's trail),
    else to a trail of its own."""
    state = ApiState(
        settings=settings,
        sessions=sessions,
        send=send,
        token=api_token(settings),
        store_context=store_context,
    )
    app = create_app(state)
    app.state.audit = audit or AuditTrail.from_settings(
        settings, sessions, source_id=settings.ae_title, type_code="3"
    )
    server = HttpServer(
        app,
        settings.http_host,
        settings.http_port,
        tls_certificate=settings.http_tls_certificate,
        tls_private_key=settings.http_tls_private_key,
    ).start()
    scheme = "https" if settings.http_tls_enabled else "http"
    log.info("HTTP service on %s://%s:%d/", scheme, settings.http_host, server.port)
    return server
