"""The node's HTTP service: REST API, STOW-RS ingest, health and metrics (FastAPI).

Every write needs ``Authorization: Bearer <token>`` (SPINE_TRIAGE_API_TOKEN; in embedded mode
a random token is made on first start and kept in VAR_DIR/api-token). Reads are open on the
configured address (loopback by default). OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.annotations import RoiIn, create_annotation
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import (
    Delivery,
    RoiAnnotation,
    Study,
    StudyState,
    TriageResult,
)
from dicom_node.broker.wake import TRIAGE_QUEUE, TRIAGE_TASK, SendTask, mark_enqueued, publish
from dicom_node.dicom.ingest import StoreContext
from dicom_node.settings import Settings
from dicom_node.web.metrics import register_metrics
from dicom_node.web.worklist import register_worklist

log = logging.getLogger(__name__)


@dataclass
class ApiState:
    settings: Settings
    sessions: sessionmaker[Session]
    send: SendTask | None
    token: str
    store_context: StoreContext | None = None


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


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _token_matches(authorization: str | None, expected: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    return value


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Documents the bearer scheme in the OpenAPI schema (the middleware enforces it first)."""
    if not _token_matches(authorization, _state(request).token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required for writes",
            headers={"WWW-Authenticate": "Bearer"},
        )


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(
        title="spine-triage",
        summary="Computer-aided triage of spine CT: flags likely malignant vertebral fractures "
        "for priority reading. Not a diagnosis.",
        version="0.1.0",
    )
    app.state.api = state

    @app.middleware("http")
    async def _writes_need_the_token(request: Request, call_next: Any) -> Any:
        # Before anything reads the body: an unauthenticated write learns nothing else.
        if request.method in WRITE_METHODS and not _token_matches(
            request.headers.get("authorization"), state.token
        ):
            return JSONResponse(
                {"detail": "a bearer token is required for writes"},
                status_code=status.HTTP_401_UNAUTHORIZED,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # JSON allows NaN/Infinity into Python; they cannot be echoed back as JSON.
        detail = _finite_json(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post(
        "/annotations",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(require_token)],
        summary="Submit a radiologist's ROI on the most abnormal vertebra",
    )
    def post_annotation(
        roi: RoiIn,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=100)] = None,
    ) -> dict[str, Any]:
        api = _state(request)
        key = f"rest:{idempotency_key}" if idempotency_key else None
        try:
            with transaction(api.sessions) as session:
                stored = create_annotation(session, roi, source="rest", source_key=key)
                ready = _study_complete(session, roi.study_instance_uid)
                if ready and stored.created:
                    mark_enqueued(session, [stored.id], datetime.now(UTC))
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable, retry later") from exc
        if ready and stored.created and api.send is not None:
            publish(api.send, TRIAGE_TASK, [stored.id], TRIAGE_QUEUE)
        if not stored.created:
            response.status_code = status.HTTP_200_OK
        return annotation_view(api, stored.id)

    @app.get("/annotations/{annotation_id}", summary="An annotation, its state and result")
    def get_annotation(annotation_id: int, request: Request) -> dict[str, Any]:
        return annotation_view(_state(request), annotation_id)

    @app.get("/annotations", summary="Annotations, newest first")
    def list_annotations(
        request: Request, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        api = _state(request)
        with api.sessions() as session:
            query = select(RoiAnnotation.id).order_by(RoiAnnotation.id.desc()).limit(limit)
            if state:
                query = query.where(RoiAnnotation.state == state)
            ids = list(session.scalars(query))
        return [annotation_view(api, annotation_id) for annotation_id in ids]

    @app.get("/studies", summary="Studies received, newest first (no patient data)")
    def list_studies(request: Request, limit: int = 100) -> list[dict[str, Any]]:
        with _state(request).sessions() as session:
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
        api = _state(request)
        checks = {"database": _check_database(api), "broker": _check_broker(api.settings)}
        healthy = all(value == "ok" for value in checks.values())
        if not healthy:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "ok" if healthy else "unavailable", **checks}

    from dicom_node.web.stow import register_stow

    register_stow(app, require_token)
    register_worklist(app)
    register_metrics(app)
    return app


def _study_complete(session: Session, study_uid: str) -> bool:
    found = session.scalar(select(Study.state).where(Study.study_instance_uid == study_uid))
    return found is StudyState.COMPLETE


def annotation_view(api: ApiState, annotation_id: int) -> dict[str, Any]:
    with api.sessions() as session:
        annotation = session.get(RoiAnnotation, annotation_id)
        if annotation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"annotation {annotation_id} not found")
        study_state = session.scalar(
            select(Study.state).where(Study.study_instance_uid == annotation.study_instance_uid)
        )
        results = session.scalars(
            select(TriageResult).where(TriageResult.annotation_id == annotation_id)
        ).all()
        view: dict[str, Any] = {
            "id": annotation.id,
            **annotation.roi_json(),
            "source": annotation.source,
            "state": annotation.state.value,
            "attempts": annotation.attempts,
            "failure_reason": annotation.failure_reason,
            "study_state": study_state.value if study_state else "not received",
            "created_at": annotation.created_at.isoformat(),
            "updated_at": annotation.updated_at.isoformat(),
            "results": [],
        }
        for result in results:
            deliveries = session.scalars(
                select(Delivery).where(Delivery.result_id == result.id).order_by(Delivery.id)
            ).all()
            view["results"].append(
                {
                    "id": result.id,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "demonstration_model": result.demonstration_model,
                    "patient_probability": result.patient_probability,
                    "slice_x_mm": result.slice_x_mm,
                    "slice_probabilities": result.slice_probabilities,
                    "label": result.label,
                    "priority": result.priority,
                    "threshold": result.threshold,
                    "sr_sop_instance_uid": result.sr_sop_instance_uid,
                    "timings_s": result.timings,
                    "created_at": result.created_at.isoformat(),
                    "deliveries": [
                        {
                            "id": delivery.id,
                            "destination": delivery.destination,
                            "kind": delivery.kind,
                            "state": delivery.state.value,
                            "attempts": delivery.attempts,
                            "last_error": delivery.last_error,
                            "delivered_at": (
                                delivery.delivered_at.isoformat() if delivery.delivered_at else None
                            ),
                        }
                        for delivery in deliveries
                    ],
                }
            )
    return view


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
    from kombu import Connection

    try:
        with Connection(settings.resolved_broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # any broker failure is reported, not raised
        return f"unavailable ({type(exc).__name__})"


class HttpServer:
    """uvicorn in a background thread."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
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
) -> HttpServer:
    state = ApiState(
        settings=settings,
        sessions=sessions,
        send=send,
        token=api_token(settings),
        store_context=store_context,
    )
    server = HttpServer(create_app(state), settings.http_host, settings.http_port).start()
    log.info("HTTP service on http://%s:%d/", settings.http_host, server.port)
    return server
