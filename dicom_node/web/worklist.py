"""The triage worklist over HTTP: ``GET /worklist`` (JSON), one study's detail, the preview
pictures, and the node's web page. The reading order and filters are those of
:mod:`dicom_node.web.worklist_query`; this is the clinical worklist, with patient names and IDs,
which never go to the logs.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request, status
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select

from dicom_node import audit
from dicom_node.archive.schema import (
    TriageResult,
)
from dicom_node.web.auth import READER, requires
from dicom_node.web.worklist_query import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    WorklistFilter,
    WorklistState,
    build_study_detail,
    build_worklist,
)

STATIC_DIR = Path(__file__).parent / "static"
# The page and its script come from this node only; nothing is fetched from elsewhere.
PAGE_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _parse_states(text: str | None) -> frozenset[WorklistState] | None:
    if not text:
        return None
    states = set()
    for part in text.split(","):
        try:
            states.add(WorklistState(part.strip()))
        except ValueError:
            choices = ", ".join(state.value for state in WorklistState)
            raise HTTPException(422, f"state: {part.strip()!r} is not one of {choices}") from None
    return frozenset(states)


def _sessions(request: Request) -> Any:
    return request.app.state.api.sessions


def _storage_root(request: Request) -> Path:
    api = request.app.state.api
    if api.store_context is not None:
        return Path(api.store_context.store.root)
    return Path(api.settings.resolved_storage_dir).resolve()


def register_worklist(app: FastAPI) -> None:
    """Add the worklist JSON, the study detail, the preview pictures and the page to ``app``."""

    @app.get(
        "/worklist",
        dependencies=[requires(READER)],
        summary="Studies in reading order: flagged first (see the module doc)",
    )
    def get_worklist(
        request: Request,
        state: Annotated[
            str | None,
            Query(description="flagged, waiting, routine, failed, awaiting_roi (comma-separated)"),
        ] = None,
        since: Annotated[date | None, Query(description="first day, YYYY-MM-DD")] = None,
        until: Annotated[date | None, Query(description="last day, YYYY-MM-DD")] = None,
        date_basis: Annotated[
            Literal["study", "received"],
            Query(description="study: Study Date (else received date); received: received date"),
        ] = "study",
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    ) -> dict[str, Any]:
        selection = WorklistFilter(_parse_states(state), since, until, date_basis, limit)
        with _sessions(request)() as session:
            worklist = build_worklist(session, selection)
        audit.query(request)
        return worklist

    @app.get(
        "/worklist/{study_instance_uid}",
        dependencies=[requires(READER)],
        summary="One study: slices, ROI, deliveries",
    )
    def get_worklist_study(study_instance_uid: str, request: Request) -> dict[str, Any]:
        with _sessions(request)() as session:
            detail = build_study_detail(session, study_instance_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "study not known to this node")
        audit.study_accessed(request, study_instance_uid)
        return detail

    @app.get(
        "/results/{result_id}/preview.png",
        dependencies=[requires(READER)],
        summary="The picture of what the model saw for a result (PNG)",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    def get_preview(result_id: int, request: Request) -> FileResponse:
        with _sessions(request)() as session:
            relative = session.scalar(
                select(TriageResult.preview_path).where(TriageResult.id == result_id)
            )
        if not relative:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no preview for this result")
        root = _storage_root(request)
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, "preview file not found")
        audit.result_accessed(request, result_id)
        return FileResponse(
            path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"}
        )

    @app.get("/", include_in_schema=False, dependencies=[requires(READER)])
    def get_page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
