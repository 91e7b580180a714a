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
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from starlette.requests import Request

from dicom_node.archive.schema import RoiAnnotation, Study, TriageResult, WebUser
from dicom_node.audit import messages
from dicom_node.audit.dicom import report
from dicom_node.audit.messages import Code, Codes, StudyRef
from dicom_node.audit.trail import AuditTrail

ANONYMOUS = "anonymous"
UNKNOWN_ACCOUNT = "unknown account"


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


def study_accessed(request: Request, study_instance_uid: str) -> None:
    """A study's detail opened: who, which study (its patient read from the index)."""
    trail = trail_of(request)
    if trail is None:
        return
    instances_accessed(request, _known_study(trail, study_instance_uid))


def result_accessed(request: Request, result_id: int) -> None:
    """A result's picture or data opened: the study it belongs to."""
    trail = trail_of(request)
    if trail is None:
        return
    try:
        with trail.sessions() as session:
            uid = session.scalar(
                select(RoiAnnotation.study_instance_uid)
                .join(TriageResult, TriageResult.annotation_id == RoiAnnotation.id)
                .where(TriageResult.id == result_id)
            )
    except Exception:  # recorded without the study rather than not at all
        uid = None
    instances_accessed(request, _known_study(trail, uid or f"result {result_id}"))


def annotation_accessed(request: Request, annotation_id: int) -> None:
    """An annotation and its result read through the API: the study they belong to."""
    trail = trail_of(request)
    if trail is None:
        return
    try:
        with trail.sessions() as session:
            uid = session.scalar(
                select(RoiAnnotation.study_instance_uid).where(RoiAnnotation.id == annotation_id)
            )
    except Exception:  # recorded without the study rather than not at all
        uid = None
    instances_accessed(request, _known_study(trail, uid or f"annotation {annotation_id}"))


def _known_study(trail: AuditTrail, study_instance_uid: str) -> StudyRef:
    try:
        with trail.sessions() as session:
            study = session.scalar(
                select(Study).where(Study.study_instance_uid == study_instance_uid)
            )
    except Exception:
        study = None
    if study is None:
        return StudyRef(study_instance_uid)
    return study_ref(study)


# The worklist page refreshes its list every few seconds: the same query by the same caller
# from the same address within this long is one event, not one per refresh.
QUERY_REPEAT_S = 60.0
_last_queries: dict[tuple[int, tuple[str, str, str]], float] = {}
_last_queries_lock = threading.Lock()


def _repeated(trail: AuditTrail, key: tuple[str, str, str]) -> bool:
    now = time.monotonic()
    with _last_queries_lock:
        if len(_last_queries) > 10_000:
            _last_queries.clear()
        previous = _last_queries.get((id(trail), key))
        if previous is not None and now - previous < QUERY_REPEAT_S:
            return True
        _last_queries[(id(trail), key)] = now
        return False


def query(request: Request, *, patient_id: str | None = None) -> None:
    """A list or search of studies (the worklist); the query is the path and parameters.
    A refresh of the same query within :data:`QUERY_REPEAT_S` is not recorded again."""
    trail = trail_of(request)
    if trail is None:
        return
    text = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    user, address = caller(request), client_address(request)
    if _repeated(trail, (user, address or "", text)):
        return
    trail.record(
        messages.query(
            trail.source,
            user=user,
            client_address=address,
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
    """Sign-in (or sign-out) of ``user``, success or failure; never the password.

    A failed sign-in names the account only when it exists: what was typed in the user box
    of a failed attempt is often a password."""
    trail = trail_of(request)
    if trail is None:
        return
    if not success and not _is_account(trail, user):
        user = UNKNOWN_ACCOUNT
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


def _is_account(trail: AuditTrail, user: str) -> bool:
    try:
        with trail.sessions() as session:
            return session.scalar(select(WebUser.id).where(WebUser.username == user)) is not None
    except Exception:
        return False


def credential_refused(request: Request, reason: str) -> None:
    """A bearer token (API token, OIDC token) refused; a request without any is not an
    alert (a browser on its way to the sign-in page)."""
    if request.headers.get("authorization"):
        security_alert(request, description=f"credential refused: {reason}", user=ANONYMOUS)


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


def stow_received(request: Request, outcomes: Iterable[Any]) -> None:
    """A STOW-RS request's instances (store outcomes: ``ok``, ``study_instance_uid``,
    ``sop_class_uid``): one *instances transferred* per study, the caller as the source."""
    trail = trail_of(request)
    if trail is None:
        return
    stored: dict[str, Counter[str]] = {}
    refused: Counter[str] = Counter()
    for outcome in outcomes:
        uid = getattr(outcome, "study_instance_uid", None)
        if not uid:
            continue
        if outcome.ok:
            stored.setdefault(uid, Counter())[outcome.sop_class_uid or "unknown"] += 1
        else:
            refused[uid] += 1
    report(
        trail,
        stored,
        refused,
        calling_ae=caller(request),
        peer_address=client_address(request),
        called_ae=trail.source.source_id,
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
