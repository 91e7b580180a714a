"""STOW-RS ingest (``POST /dicomweb/studies``): the same durable path as C-STORE.

The body is ``multipart/related; type="application/dicom"``, one Part-10 object per part.
The answer is the standard STOW-RS response (PS3.18 §10.5): a DICOM JSON dataset with the
Referenced SOP Sequence (0008,1199) for stored instances and the Failed SOP Sequence
(0008,1198) with a Failure Reason (0008,1197) for the others; HTTP 200 when all were stored,
202 when some failed, 409 when none could be stored.
"""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node import audit
from dicom_node.dicom.ingest import store_instance
from dicom_node.web.access import api_state
from dicom_node.web.auth import ANNOTATOR, requires

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


def split_multipart_related(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body whose type is application/dicom."""
    if not content_type.lower().startswith("multipart/related"):
        raise ValueError('expected Content-Type multipart/related; type="application/dicom"')
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    assert isinstance(message, EmailMessage)
    if not message.is_multipart():
        raise ValueError("the body is not a multipart message (boundary missing?)")
    parts = []
    for part in message.iter_parts():
        part_type = part.get_content_type()
        if part_type != "application/dicom":
            raise ValueError(f"unsupported part type {part_type!r}: only application/dicom")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise ValueError("empty part")
        parts.append(payload)
    if not parts:
        raise ValueError("no DICOM part in the body")
    return parts


def _item(sop_class: str | None, sop_instance: str | None, failure: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    if failure is not None:
        item["00081197"] = {"vr": "US", "Value": [failure]}
    return item


def register_stow(app: FastAPI) -> None:
    @app.post(
        "/dicomweb/studies",
        dependencies=[requires(ANNOTATOR)],
        summary="STOW-RS: store instances (multipart/related; type=application/dicom)",
        response_class=JSONResponse,
    )
    async def stow(request: Request) -> JSONResponse:
        api = api_state(request)
        if api.store_context is None:
            raise HTTPException(503, "storage is not available on this service")
        try:
            parts = split_multipart_related(
                request.headers.get("content-type", ""), await request.body()
            )
        except ValueError as exc:
            raise HTTPException(415, str(exc)) from exc
        referenced, failed, outcomes = [], [], []
        for data in parts:
            outcome = store_instance(
                api.store_context, data, transfer_syntax=None, source="STOW-RS"
            )
            outcomes.append(outcome)
            if outcome.ok:
                referenced.append(_item(outcome.sop_class_uid, outcome.sop_instance_uid, None))
            else:
                failed.append(
                    _item(outcome.sop_class_uid, outcome.sop_instance_uid, outcome.status)
                )
        body: dict[str, Any] = {}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else (202 if referenced else 409)
        log.info("STOW-RS: %d stored, %d failed", len(referenced), len(failed))
        await run_in_threadpool(audit.stow_received, request, outcomes)
        return JSONResponse(body, status_code=code, media_type=DICOM_JSON)
