"""The triage worklist's queries: studies in reading order, and one study's detail.

Reading order (``GET /worklist``):

1. **flagged** — the study's current result has priority HIGH; by descending probability;
2. **waiting** — images still arriving, or an ROI waiting for (or being processed by) a
   worker; the longest waiting first;
3. **routine** — the current result has priority ROUTINE; by descending probability;
4. **failed** (the job failed; its reason is shown), **not_analysed** (automatic analysis
   could not analyse the study: no spine in view, too few slices, …; the reason is shown),
   then **awaiting_roi** (images complete, no ROI yet); newest first.

Only live results count (``role`` live): a shadow candidate's results (shadow mode,
:mod:`worker.shadow`) never flag, order or describe a study; the detail lists them apart,
under ``shadow``. Every result names the model that produced it: name, version and the
checkpoint's sha256.

A study has up to two lines of work: its newest reader's ROI (REST, SR, CSV) with that
annotation's newest result (a newer model version supersedes an older one), and its automatic
job (every body the localiser found) with that job's newest result. Each gets a state as above;
the study takes the earlier of the two in reading order (a flag from either flags the study),
and says which one it shows (``source``: ``reader`` or ``automatic``); both are in the item.
Studies an ROI names but whose images have not arrived are listed as waiting, without patient
data.

Filters: ``state`` (one or several, comma-separated), ``since`` / ``until`` (inclusive
``YYYY-MM-DD``) on the study date (DICOM Study Date; the date the node first received the
study when the Study Date is missing) or, with ``date_basis=received``, on the date (UTC) the
node first received the study. The list is built with four queries whatever its length.

This is the clinical worklist: it shows patient names and IDs, which never go to the logs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.archive.schema import (
    AnnotationState,
    AutoJob,
    AutoJobState,
    Delivery,
    RoiAnnotation,
    Study,
    StudyState,
    TriageResult,
)

_R = TypeVar("_R")
LIVE_ROLE = "live"  # the results that count; "shadow": a candidate's, for comparison only
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000


class WorklistState(enum.StrEnum):
    """A study's place on the worklist; the members are in reading order."""

    FLAGGED = "flagged"
    WAITING = "waiting"
    ROUTINE = "routine"
    FAILED = "failed"
    NOT_ANALYSED = "not_analysed"
    AWAITING_ROI = "awaiting_roi"


GROUP_RANK = {state: rank for rank, state in enumerate(WorklistState)}


@dataclass(frozen=True)
class WorklistFilter:
    states: frozenset[WorklistState] | None = None
    since: date | None = None
    until: date | None = None
    date_basis: Literal["study", "received"] = "study"
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True)
class _StudyRow:
    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    study_date: str | None
    study_description: str | None
    state: StudyState
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True)
class _AnnotationRow:
    id: int
    study_instance_uid: str
    state: AnnotationState
    failure_reason: str | None
    vertebra: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class _ResultRow:
    id: int
    annotation_id: int
    patient_probability: float
    label: str
    priority: str
    threshold: float
    domain_score: float | None
    domain_threshold: float | None
    in_domain: bool | None
    model_name: str
    model_version: str
    checkpoint_sha256: str | None
    demonstration_model: bool
    preview_path: str | None
    created_at: datetime
    auto_job_id: int | None
    bodies: list[dict[str, Any]] | None

    @property
    def flagged_vertebra(self) -> str | None:
        """An automatic result's most suspicious body's level."""
        return self.bodies[0].get("vertebra") if self.bodies else None


@dataclass(frozen=True)
class _AutoJobRow:
    id: int
    study_instance_uid: str
    state: AutoJobState
    unanalysable_reason: str | None
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime


def _columns(model: type[Any], row: type[Any]) -> list[Any]:
    return [getattr(model, name) for name in row.__dataclass_fields__]


def _row_of(row: type[_R], instance: object) -> _R:
    names = getattr(row, "__dataclass_fields__")  # noqa: B009 (a dataclass type variable)
    return row(*(getattr(instance, name) for name in names))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _dicom_date(value: str | None) -> date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when absent or malformed."""
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


# The newest reader's annotation of each study, the newest result of each annotation (an
# automatic job's result is the one of its most suspicious body's annotation).
LATEST_ANNOTATIONS = (
    select(func.max(RoiAnnotation.id))
    .where(RoiAnnotation.auto_job_id.is_(None))
    .group_by(RoiAnnotation.study_instance_uid)
)
LATEST_RESULTS = (
    select(func.max(TriageResult.id))
    .where(TriageResult.role == LIVE_ROLE)
    .group_by(TriageResult.annotation_id)
)


def _delivery_counts(session: Session, result_ids: Any) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    rows = session.execute(
        select(Delivery.result_id, Delivery.state, func.count())
        .where(Delivery.result_id.in_(result_ids))
        .group_by(Delivery.result_id, Delivery.state)
    )
    for result_id, state, count in rows:
        summary = counts.setdefault(
            result_id, {"total": 0, "delivered": 0, "pending": 0, "sending": 0, "failed": 0}
        )
        summary[state.value] = int(count)
        summary["total"] += int(count)
    return counts


OUTSIDE_DOMAIN = "outside the model's training domain"


def classify(
    study: _StudyRow | None, annotation: _AnnotationRow | None, result: _ResultRow | None
) -> tuple[WorklistState, str]:
    """The study's worklist state and what it is waiting for / why it failed (short text)."""
    if annotation is None:
        if study is not None and study.state is StudyState.RECEIVING:
            return WorklistState.WAITING, "receiving images"
        return WorklistState.AWAITING_ROI, "images complete, no ROI yet"
    if annotation.state is AnnotationState.FAILED:
        return WorklistState.FAILED, annotation.failure_reason or "failed"
    if annotation.state is AnnotationState.DONE and result is not None:
        if result.priority == "HIGH":
            return WorklistState.FLAGGED, "probability at or above the threshold"
        if result.in_domain is False:
            return WorklistState.ROUTINE, f"{OUTSIDE_DOMAIN}: not flagged"
        return WorklistState.ROUTINE, "probability below the threshold"
    if study is None:
        return WorklistState.WAITING, "ROI received, images not yet"
    if study.state is StudyState.RECEIVING:
        return WorklistState.WAITING, "receiving images"
    if annotation.state is AnnotationState.PROCESSING:
        return WorklistState.WAITING, "processing"
    if annotation.failure_reason:
        return WorklistState.WAITING, f"retrying after: {annotation.failure_reason}"
    return WorklistState.WAITING, "queued for a worker"


def classify_automatic(job: _AutoJobRow, result: _ResultRow | None) -> tuple[WorklistState, str]:
    """The state of a study's automatic job, and what it is waiting for / why it stopped. A
    result shows from the moment it is recorded (its flag is sent then), while the job still
    writes the report."""
    if result is not None and job.state is not AutoJobState.FAILED:
        on = f" on {result.flagged_vertebra}" if result.flagged_vertebra else ""
        if result.priority == "HIGH":
            return WorklistState.FLAGGED, f"automatic: probability at or above the threshold{on}"
        if result.in_domain is False:
            return WorklistState.ROUTINE, f"automatic: {OUTSIDE_DOMAIN}{on}: not flagged"
        return WorklistState.ROUTINE, "automatic: every body below the threshold"
    if job.state is AutoJobState.UNANALYSABLE:
        return WorklistState.NOT_ANALYSED, f"could not analyse: {job.unanalysable_reason}"
    if job.state is AutoJobState.FAILED:
        return WorklistState.FAILED, job.failure_reason or "automatic analysis failed"
    if job.state is AutoJobState.PROCESSING:
        return WorklistState.WAITING, "automatic analysis in progress"
    if job.failure_reason:
        return WorklistState.WAITING, f"automatic analysis retrying after: {job.failure_reason}"
    return WorklistState.WAITING, "queued for automatic analysis"


@dataclass(frozen=True)
class _Entry:
    """One study's rows and its state, before it becomes JSON (only the page's entries do)."""

    uid: str
    study: _StudyRow | None
    annotation: _AnnotationRow | None
    result: _ResultRow | None
    job: _AutoJobRow | None = None
    auto_result: _ResultRow | None = None

    @property
    def reader(self) -> tuple[WorklistState, str]:
        return classify(self.study, self.annotation, self.result)

    @property
    def automatic(self) -> tuple[WorklistState, str] | None:
        return classify_automatic(self.job, self.auto_result) if self.job else None

    @property
    def source(self) -> str:
        """Which line of work the study's state comes from: ``reader`` or ``automatic``."""
        automatic = self.automatic
        if automatic is None:
            return "reader"
        if self.annotation is None:
            return "automatic"
        reader = self.reader
        return "automatic" if GROUP_RANK[automatic[0]] < GROUP_RANK[reader[0]] else "reader"

    @property
    def state_and_activity(self) -> tuple[WorklistState, str]:
        automatic = self.automatic
        if self.source == "automatic" and automatic is not None:
            return automatic
        return self.reader

    @property
    def state(self) -> WorklistState:
        return self.state_and_activity[0]

    @property
    def shown_result(self) -> _ResultRow | None:
        """The result of the line of work shown (else the other's, when it has one)."""
        if self.source == "automatic":
            return self.auto_result or self.result
        return self.result or self.auto_result

    def sort_key(self) -> tuple[Any, ...]:
        rank = GROUP_RANK[self.state]
        study, annotation, result = self.study, self.annotation, self.shown_result
        if result is not None and self.state in (WorklistState.FLAGGED, WorklistState.ROUTINE):
            return (rank, -result.patient_probability, -result.created_at.timestamp(), self.uid)
        if self.state is WorklistState.WAITING:  # the longest waiting first
            since = annotation.created_at if annotation else _first_received(study)
            return (rank, 0.0, since.timestamp() if since else 0.0, self.uid)
        latest = (
            annotation.updated_at
            if annotation
            else self.job.updated_at
            if self.job
            else study.last_received_at
            if study
            else None
        )
        return (rank, 0.0, -latest.timestamp() if latest else 0.0, self.uid)

    def day(self, basis: str) -> date | None:
        if basis == "study" and self.study is not None:
            study_date = _dicom_date(self.study.study_date)
            if study_date is not None:
                return study_date
        moment = _first_received(self.study) or (self.annotation and self.annotation.created_at)
        return moment.astimezone(UTC).date() if moment else None


def _line(state: tuple[WorklistState, str], result: _ResultRow | None) -> dict[str, Any]:
    return {
        "state": state[0].value,
        "activity": state[1],
        "probability": result.patient_probability if result else None,
        "priority": result.priority if result else None,
        "result_id": result.id if result else None,
    }


def _item(entry: _Entry, deliveries: dict[str, int] | None) -> dict[str, Any]:
    uid, study, annotation = entry.uid, entry.study, entry.annotation
    result = entry.shown_result
    state, activity = entry.state_and_activity
    source = entry.source
    vertebra = (
        result.flagged_vertebra
        if result is not None and result.auto_job_id is not None
        else annotation.vertebra
        if annotation
        else None
    )
    study_date = _dicom_date(study.study_date) if study else None
    return {
        "study_instance_uid": uid,
        "accession_number": study.accession_number if study else None,
        "patient_name": study.patient_name if study else None,
        "patient_id": study.patient_id if study else None,
        "study_date": study_date.isoformat() if study_date else None,
        "study_description": study.study_description if study else None,
        "study_state": study.state.value if study else "not received",
        "instances": study.instance_count if study else 0,
        "state": state.value,
        "activity": activity,
        "source": source,
        "reader": _line(entry.reader, entry.result) if annotation else None,
        "automatic": (
            {
                **_line(entry.automatic, entry.auto_result),
                "job_id": entry.job.id,
                "vertebra": entry.auto_result.flagged_vertebra if entry.auto_result else None,
                "unanalysable_reason": entry.job.unanalysable_reason,
            }
            if entry.job and entry.automatic
            else None
        ),
        "failure_reason": annotation.failure_reason if annotation else None,
        "probability": result.patient_probability if result else None,
        "label": result.label if result else None,
        "priority": result.priority if result else None,
        "threshold": result.threshold if result else None,
        # The out-of-domain guard (None: the model has none): outside its training domain a
        # result is shown as such and never flagged.
        "domain": (
            {
                "score": result.domain_score,
                "threshold": result.domain_threshold,
                "in_domain": result.in_domain,
            }
            if result and result.in_domain is not None
            else None
        ),
        "model": (
            {
                "name": result.model_name,
                "version": result.model_version,
                "sha256": result.checkpoint_sha256,
                "demonstration": result.demonstration_model,
            }
            if result
            else None
        ),
        "annotation_id": annotation.id if annotation else None,
        "annotation_state": annotation.state.value if annotation else None,
        "vertebra": vertebra,
        "result_id": result.id if result else None,
        "preview_url": (
            f"/results/{result.id}/preview.png" if result and result.preview_path else None
        ),
        "deliveries": deliveries
        or {"total": 0, "delivered": 0, "pending": 0, "sending": 0, "failed": 0},
        "received_at": _iso(study.first_received_at) if study else None,
        "last_received_at": _iso(study.last_received_at) if study else None,
        "completed_at": _iso(study.completed_at) if study else None,
        "annotated_at": _iso(annotation.created_at) if annotation else None,
        "result_at": _iso(result.created_at) if result else None,
        "updated_at": _iso(annotation.updated_at) if annotation else None,
        "detail_url": f"/worklist/{uid}",
    }


def _first_received(study: _StudyRow | None) -> datetime | None:
    return study.first_received_at if study else None


def _study_rows(session: Session, uids: Iterable[str] | None = None) -> dict[str, _StudyRow]:
    query = select(*_columns(Study, _StudyRow))
    if uids is not None:
        query = query.where(Study.study_instance_uid.in_(list(uids)))
    return {row[0]: _StudyRow(*row) for row in session.execute(query)}


def build_worklist(session: Session, selection: WorklistFilter) -> dict[str, Any]:
    """The worklist in reading order, with the number of studies per state (before ``states``)."""
    studies = _study_rows(session)
    annotation_query = select(*_columns(RoiAnnotation, _AnnotationRow)).where(
        RoiAnnotation.id.in_(LATEST_ANNOTATIONS)
    )
    annotations = {
        row.study_instance_uid: row
        for row in (_AnnotationRow(*values) for values in session.execute(annotation_query))
    }
    result_query = select(*_columns(TriageResult, _ResultRow)).where(
        TriageResult.id.in_(LATEST_RESULTS)
    )
    results: dict[int, _ResultRow] = {}
    auto_results: dict[int, _ResultRow] = {}
    for values in session.execute(result_query):
        row = _ResultRow(*values)
        if row.auto_job_id is None:
            results[row.annotation_id] = row
        else:
            previous = auto_results.get(row.auto_job_id)
            if previous is None or previous.id < row.id:
                auto_results[row.auto_job_id] = row
    jobs = {
        row.study_instance_uid: row
        for row in (
            _AutoJobRow(*values)
            for values in session.execute(select(*_columns(AutoJob, _AutoJobRow)))
        )
    }
    entries = []
    for uid in studies.keys() | annotations.keys() | jobs.keys():
        study, annotation, job = studies.get(uid), annotations.get(uid), jobs.get(uid)
        result = results.get(annotation.id) if annotation else None
        auto_result = auto_results.get(job.id) if job else None
        entries.append(_Entry(uid, study, annotation, result, job, auto_result))
    if selection.since or selection.until:
        entries = [entry for entry in entries if _in_dates(entry, selection)]
    counts = {state.value: 0 for state in WorklistState}
    for entry in entries:
        counts[entry.state.value] += 1
    if selection.states:
        entries = [entry for entry in entries if entry.state in selection.states]
    entries.sort(key=_Entry.sort_key)
    deliveries = _delivery_counts(session, LATEST_RESULTS)
    items = []
    for entry in entries[: selection.limit]:
        shown = entry.shown_result
        items.append(_item(entry, deliveries.get(shown.id) if shown else None))
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "total": len(entries),
        "counts": counts,
        "items": items,
    }


def _in_dates(entry: _Entry, selection: WorklistFilter) -> bool:
    day = entry.day(selection.date_basis)
    if day is None:
        return False
    if selection.since and day < selection.since:
        return False
    return not (selection.until and day > selection.until)


def build_study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    """One study's worklist item with its per-slice probabilities, ROI, bodies (automatic
    analysis) and deliveries."""
    study = _study_rows(session, [study_uid]).get(study_uid)
    annotations = session.scalars(
        select(RoiAnnotation)
        .where(RoiAnnotation.study_instance_uid == study_uid)
        .order_by(RoiAnnotation.id.desc())
    ).all()
    job = session.scalar(select(AutoJob).where(AutoJob.study_instance_uid == study_uid))
    if study is None and not annotations and job is None:
        return None
    readers = [a for a in annotations if a.auto_job_id is None]
    annotation = readers[0] if readers else None
    result = None
    if annotation is not None:
        result = session.scalar(
            select(TriageResult)
            .where(TriageResult.annotation_id == annotation.id, TriageResult.role == LIVE_ROLE)
            .order_by(TriageResult.id.desc())
            .limit(1)
        )
    auto_result = None
    if job is not None:
        auto_result = session.scalar(
            select(TriageResult)
            .where(TriageResult.auto_job_id == job.id, TriageResult.role == LIVE_ROLE)
            .order_by(TriageResult.id.desc())
            .limit(1)
        )
    entry = _Entry(
        study_uid,
        study,
        _row_of(_AnnotationRow, annotation) if annotation else None,
        _row_of(_ResultRow, result) if result else None,
        _row_of(_AutoJobRow, job) if job else None,
        _row_of(_ResultRow, auto_result) if auto_result else None,
    )
    shown = auto_result if entry.source == "automatic" and auto_result else result or auto_result
    deliveries: Sequence[Delivery] = []
    if shown is not None:
        query = select(Delivery).where(Delivery.result_id == shown.id).order_by(Delivery.id)
        deliveries = session.scalars(query).all()
    summary = _delivery_counts(session, [shown.id]).get(shown.id) if shown else None
    detail = _item(entry, summary)
    detail["slices"] = [
        {"x_mm": x, "probability": p}
        for x, p in (zip(shown.slice_x_mm, shown.slice_probabilities, strict=True) if shown else [])
    ]
    shown_annotation = shown.annotation if shown is not None else annotation
    detail["roi"] = (
        {
            **shown_annotation.roi().to_json(),
            "source": shown_annotation.source,
            "annotator": shown_annotation.annotator,
        }
        if shown_annotation
        else None
    )
    detail["bodies"] = list(shown.bodies or []) if shown is not None else []
    detail["timings"] = dict(shown.timings) if shown else {}
    detail["sr_sop_instance_uid"] = shown.sr_sop_instance_uid if shown else None
    detail["delivery_list"] = [_plain(d, DELIVERY_FIELDS) for d in deliveries]
    detail["annotations"] = [_plain(a, ANNOTATION_FIELDS) for a in readers]
    detail["shadow"] = _shadow_results(session, shown)
    detail["shadow_failure"] = shown.shadow_failure if shown else None
    return detail


def _shadow_results(session: Session, shown: TriageResult | None) -> list[dict[str, Any]]:
    """Shadow mode: what candidate checkpoints answered on the job of the shown result."""
    if shown is None:
        return []
    same_job = (
        TriageResult.auto_job_id == shown.auto_job_id
        if shown.auto_job_id is not None
        else TriageResult.annotation_id == shown.annotation_id
    )
    rows = session.scalars(
        select(TriageResult)
        .where(same_job, TriageResult.role != LIVE_ROLE)
        .order_by(TriageResult.id)
    )
    return [_plain(row, SHADOW_FIELDS) for row in rows]


DELIVERY_FIELDS = [
    "id",
    "destination",
    "kind",
    "state",
    "attempts",
    "max_attempts",
    "last_error",
    "next_attempt_at",
    "delivered_at",
]
ANNOTATION_FIELDS = ["id", "state", "source", "created_at", "failure_reason"]
SHADOW_FIELDS = [
    "id",
    "model_name",
    "model_version",
    "checkpoint_sha256",
    "patient_probability",
    "priority",
    "threshold",
    "created_at",
]


def _plain(row: object, names: Sequence[str]) -> dict[str, Any]:
    """Named attributes of a row as JSON values (enums by value, times in ISO 8601)."""
    values: dict[str, Any] = {}
    for name in names:
        value = getattr(row, name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, datetime):
            value = value.isoformat()
        values[name] = value
    return values
