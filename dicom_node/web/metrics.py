"""Prometheus metrics at ``/metrics``.

Two kinds, because the node and the workers are separate processes:

- **counted by this node process** (reset when it restarts, as Prometheus counters may be):
  ``spine_triage_instances_received_total`` and ``spine_triage_studies_received_total``,
  incremented by :func:`count_instance_received`, which the ingest path calls for every
  instance it stored (C-STORE or STOW-RS). A study counts once, when this process first
  stores one of its instances (it remembers the last 10 000 studies it saw); and the audit
  trail's ``spine_triage_audit_*`` (events recorded, messages sent to the audit repository,
  dropped because its queue was full, failed attempts, still queued:
  :class:`dicom_node.audit.AuditCounters`);
- **read from the database at each scrape** (the archive of record, shared by every
  process, so what any worker did is counted): studies by state, jobs (ROI annotations) by
  state and the age of the oldest pending one, results by priority and by the out-of-domain
  guard's verdict (``spine_triage_results_by_domain_total{domain="outside"}``), the inference
  time of every result (a histogram built from ``TriageResult.timings["inference_s"]`` in one
  aggregate query), and deliveries by state, destination and kind. When the database cannot
  be read the scrape still answers, with ``spine_triage_database_up 0``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    RoiAnnotation,
    Study,
    StudyState,
    TriageResult,
)
from dicom_node.audit import AuditCounters

log = logging.getLogger(__name__)

PREFIX = "spine_triage"
INFERENCE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REMEMBERED_STUDIES = 10_000

INSTANCES_RECEIVED = Counter(
    f"{PREFIX}_instances_received",
    "DICOM instances this node process stored (C-STORE and STOW-RS), since it started.",
    registry=None,
)
STUDIES_RECEIVED = Counter(
    f"{PREFIX}_studies_received",
    "Studies of which this node process stored a first instance, since it started.",
    registry=None,
)
_seen_studies: OrderedDict[str, None] = OrderedDict()
_seen_lock = threading.Lock()


def count_instance_received(study_instance_uid: str) -> None:
    """Count one stored instance (and its study, the first time this process sees it).

    Call it after the instance is durable (``StoreContext.on_stored``); it never raises.
    """
    INSTANCES_RECEIVED.inc()
    with _seen_lock:
        if study_instance_uid in _seen_studies:
            _seen_studies.move_to_end(study_instance_uid)
            return
        _seen_studies[study_instance_uid] = None
        if len(_seen_studies) > _REMEMBERED_STUDIES:
            _seen_studies.popitem(last=False)
    STUDIES_RECEIVED.inc()


class NodeCounters(Collector):
    """The process-wide counters above, exposed through an app's own registry."""

    def collect(self) -> Iterator[Metric]:
        yield from INSTANCES_RECEIVED.collect()
        yield from STUDIES_RECEIVED.collect()


class DatabaseMetrics(Collector):
    """Metrics computed from the database at each scrape (a handful of aggregate queries)."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self._sessions = sessions

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to query at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_database_up", "Whether the metrics could be read from the database."
        )
        try:
            with self._sessions()() as session:
                metrics = list(_database_metrics(session))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from metrics


def _database_metrics(session: Session) -> Iterator[Metric]:
    studies = GaugeMetricFamily(
        f"{PREFIX}_studies", "Studies in the database, by state.", labels=["state"]
    )
    studies_by_state: dict[StudyState, int] = {
        state: count
        for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state))
    }
    for study_state in StudyState:
        studies.add_metric([study_state.value], float(studies_by_state.get(study_state, 0)))
    yield studies

    jobs = GaugeMetricFamily(
        f"{PREFIX}_jobs", "Triage jobs (ROI annotations), by state.", labels=["state"]
    )
    jobs_by_state: dict[AnnotationState, int] = {
        state: count
        for state, count in session.execute(
            select(RoiAnnotation.state, func.count()).group_by(RoiAnnotation.state)
        )
    }
    for job_state in AnnotationState:
        jobs.add_metric([job_state.value], float(jobs_by_state.get(job_state, 0)))
    yield jobs

    oldest = session.scalar(
        select(func.min(RoiAnnotation.created_at)).where(
            RoiAnnotation.state == AnnotationState.PENDING
        )
    )
    age = GaugeMetricFamily(
        f"{PREFIX}_oldest_pending_job_age_seconds",
        "Age of the oldest pending triage job (0 when none is pending).",
    )
    age.add_metric([], _age_s(oldest))
    yield age

    results = CounterMetricFamily(
        f"{PREFIX}_results",
        "Triage results recorded by the live model, by priority (shadow mode's candidate "
        "results are not counted: they flag nothing).",
        labels=["priority"],
    )
    by_priority = dict(
        session.execute(
            select(TriageResult.priority, func.count())
            .where(TriageResult.role == "live")
            .group_by(TriageResult.priority)
        ).all()
    )
    for priority in sorted({"HIGH", "ROUTINE", *by_priority}):
        results.add_metric([priority], float(by_priority.get(priority, 0)))
    yield results

    domain = CounterMetricFamily(
        f"{PREFIX}_results_by_domain",
        "Live triage results by the out-of-domain guard's verdict: inside or outside the "
        "model's training domain (outside: never flagged), or unguarded (a model without a "
        "domain description).",
        labels=["domain"],
    )
    verdict = case(
        (TriageResult.in_domain.is_(None), "unguarded"),
        (TriageResult.in_domain.is_(True), "inside"),
        else_="outside",
    )
    by_domain: dict[str, int] = dict(
        session.execute(
            select(verdict, func.count()).where(TriageResult.role == "live").group_by(verdict)
        ).all()
    )
    for name in ("inside", "outside", "unguarded"):
        domain.add_metric([name], float(by_domain.get(name, 0)))
    yield domain

    yield _inference_histogram(session)

    deliveries = GaugeMetricFamily(
        f"{PREFIX}_deliveries",
        "Deliveries (outbox rows), by state, destination and kind.",
        labels=["state", "destination", "kind"],
    )
    rows = session.execute(
        select(Delivery.state, Delivery.destination, Delivery.kind, func.count()).group_by(
            Delivery.state, Delivery.destination, Delivery.kind
        )
    )
    for delivery_state, destination, kind, count in rows:
        deliveries.add_metric([delivery_state.value, destination, kind], float(count))
    yield deliveries


def _age_s(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


def _inference_histogram(session: Session) -> HistogramMetricFamily:
    """Inference seconds of every recorded result: bucket counts in one aggregate query."""
    seconds = TriageResult.timings["inference_s"].as_float()
    columns = [func.count(seconds), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.sum(case((seconds <= bound, 1), else_=0)) for bound in INFERENCE_BUCKETS_S]
    row = session.execute(select(*columns).where(TriageResult.role == "live")).one()
    count, total = int(row[0] or 0), float(row[1] or 0.0)
    buckets = [
        (_bound_label(bound), float(value or 0))
        for bound, value in zip(INFERENCE_BUCKETS_S, row[2:], strict=True)
    ]
    buckets.append(("+Inf", float(count)))
    histogram = HistogramMetricFamily(
        f"{PREFIX}_inference_seconds",
        "Model inference time per triage job (from the recorded results).",
    )
    histogram.add_metric([], buckets, sum_value=total)
    return histogram


def _bound_label(bound: float) -> str:
    return repr(float(bound))


def make_registry(sessions: Callable[[], sessionmaker[Session]]) -> CollectorRegistry:
    """A registry of the node's metrics; one per app, so several apps can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCounters())
    registry.register(AuditCounters())
    registry.register(DatabaseMetrics(sessions))
    ProcessCollector(namespace=PREFIX, registry=registry)
    return registry


def register_metrics(app: FastAPI) -> None:
    """Add ``GET /metrics`` (Prometheus text format) to ``app``."""
    registry = make_registry(lambda: app.state.api.sessions)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def get_metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
