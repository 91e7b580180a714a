"""Audit calls for the HTTP service: one line at each route that reads patient data.

Every function takes the request and finds the trail at ``request.app.state.audit`` (set by
:func:`dicom_node.web.app.start_http`); without one it does nothing. The caller is
``request.state.principal`` (set by the authentication check: a user, a token, an OIDC
subject); before it is set, a request carrying the node's API token is ``api-token`` and any
other ``anonymous``. The client address is the peer's (a reverse proxy's address unless the
server is told to trust its forwarded headers).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from dicom_node.audit import messages
from dicom_node.audit.messages import Code, Codes, StudyRef
from dicom_node.audit.trail import AuditTrail

ANONYMOUS = "anonymous"


def trail_of(request: Request) -> AuditTrail | None:
    trail = getattr(request.app.state, "audit", None)
    return trail if isinstance(trail, AuditTrail) else None


def caller(request: Request) -> str:
    """Who is asking: the authenticated principal's name, else the API token or anonymous."""
    principal = getattr(request.state, "principal", None)
    name = getattr(principal, "name", None)
    if name:
        return str(name)
    token = getattr(getattr(request.app.state, "api", None), "token", None)
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    if (
        token
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), str(token).encode())
    ):
        return "api-token"
    return ANONYMOUS


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _what(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def study_ref(study: Any, **extra: Any) -> StudyRef:
    """A :class:`StudyRef` from a ``Study`` row (or anything with its attributes)."""
    return StudyRef(
        study_instance_uid=str(study.study_instance_uid),
        patient_id=getattr(study, "patient_id", None),
        patient_name=getattr(study, "patient_name", None),
        accession_number=getattr(study, "accession_number", None),
        **extra,
    )


def instances_accessed(request: Request, study: StudyRef) -> None:
    """A study's data read: a worklist detail, a result, a preview."""
    trail = trail_of(request)
    if trail is None:
        return
    trail.record(
        messages.instances_accessed(
            trail.source,
            study,
            user=caller(request),
            client_address=client_address(request),
            what=_what(request),
        )
    )


def query(request: Request, *, patient_id: str | None = None) -> None:
    """A list or search of studies (the worklist); the query is the path and parameters."""
    trail = trail_of(request)
    if trail is None:
        return
    text = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    trail.record(
        messages.query(
            trail.source,
            user=caller(request),
            client_address=client_address(request),
            responder=trail.source.source_id,
            query_text=text,
            patient_id=patient_id,
        )
    )


def user_authentication(
    request: Request,
    *,
    user: str,
    success: bool,
    logout: bool = False,
    description: str | None = None,
) -> None:
    """Sign-in (or sign-out) of ``user``, success or failure; never the password."""
    trail = trail_of(request)
    if trail is None:
        return
    trail.record(
        messages.user_authentication(
            trail.source,
            user=user or ANONYMOUS,
            client_address=client_address(request),
            success=success,
            logout=logout,
            authenticator=trail.source.source_id,
            description=description,
        )
    )


def security_alert(
    request: Request,
    *,
    description: str,
    user: str | None = None,
    kind: Code = Codes.USE_OF_RESTRICTED_FUNCTION,
) -> None:
    """A refused credential or a refused use of a function (a write without the token)."""
    trail = trail_of(request)
    if trail is None:
        return
    address = client_address(request)
    trail.record(
        messages.security_alert(
            trail.source,
            kind=kind,
            reporter=trail.source.source_id,
            subject=user or caller(request),
            subject_address=address,
            description=f"{description} ({_what(request)})",
            user=user,
        )
    )


def export(request: Request, studies: Iterable[StudyRef], *, destination: str) -> None:
    """Patient data downloaded from the node (one message per patient)."""
    trail = trail_of(request)
    if trail is None:
        return
    by_patient: dict[str | None, list[StudyRef]] = {}
    for ref in studies:
        by_patient.setdefault(ref.patient_id, []).append(ref)
    for refs in by_patient.values():
        trail.record(
            messages.export(
                trail.source,
                refs,
                user=caller(request),
                client_address=client_address(request),
                destination=destination,
            )
        )
