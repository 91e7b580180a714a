"""The lifecycle rules on their own, on SQLite and PostgreSQL: every state and move of studies,
annotations, automatic jobs and deliveries, and the one definition of ready, claimable and due."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive import lifecycle
from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import (
    AnnotationState,
    AutoJob,
    AutoJobState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    Study,
    StudyState,
    TriageResult,
)
from dicom_node.settings import FolderDestination
from model.serving.roi import Roi

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.100"
SERIES = "1.2.826.0.1.3680043.8.498.101"
LEASE_S = 60.0


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(database_url)
    engine: Engine = make_engine(database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def _roi(study: str = STUDY) -> Roi:
    return Roi(
        study_instance_uid=study,
        series_instance_uid=SERIES,
        slices_x_mm=(-3.0, 0.0, 3.0),
        polygon_yz_mm=((0.0, 0.0), (20.0, 0.0), (20.0, 20.0), (0.0, 20.0)),
        vertebra="L1",
    )


def _receive(sessions: sessionmaker[Session], at: datetime, study: str = STUDY) -> None:
    """An instance of ``study`` arrives (as the index records it)."""
    with transaction(sessions) as session:
        connection = session.connection()
        lifecycle.open_study(connection, study, {}, now=at)
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study))
        assert study_id is not None
        lifecycle.instance_received(connection, study_id, now=at, new=True)


def _study(sessions: sessionmaker[Session], study: str = STUDY) -> Study:
    with sessions() as session:
        row = session.scalar(select(Study).where(Study.study_instance_uid == study))
        assert row is not None
        return row


def _annotation(sessions: sessionmaker[Session], annotation_id: int) -> RoiAnnotation:
    with sessions() as session:
        row = session.get(RoiAnnotation, annotation_id)
        assert row is not None
        return row


def _complete(sessions: sessionmaker[Session], at: datetime) -> list[str]:
    with transaction(sessions) as session:
        return lifecycle.complete_quiet_studies(session, quiet_period_s=30, now=at)


def test_a_study_completes_after_its_quiet_period_and_reopens_on_a_late_instance(
    sessions: sessionmaker[Session],
) -> None:
    _receive(sessions, T0)
    _receive(sessions, T0 + timedelta(seconds=10))
    assert _study(sessions).state is StudyState.RECEIVING
    assert _study(sessions).instance_count == 2

    assert _complete(sessions, T0 + timedelta(seconds=39)) == []  # 29 s after the last one
    assert _complete(sessions, T0 + timedelta(seconds=40)) == [STUDY]
    study = _study(sessions)
    assert (study.state, study.completion_count) == (StudyState.COMPLETE, 1)
    assert _complete(sessions, T0 + timedelta(seconds=90)) == []  # complete stays complete

    _receive(sessions, T0 + timedelta(seconds=100))  # a late instance
    assert _study(sessions).state is StudyState.RECEIVING
    assert _complete(sessions, T0 + timedelta(seconds=130)) == [STUDY]
    assert _study(sessions).completion_count == 2


def test_a_retrieved_study_is_complete_and_counted(sessions: sessionmaker[Session]) -> None:
    _receive(sessions, T0)
    with transaction(sessions) as session:
        lifecycle.complete_retrieved_study(session, STUDY, now=T0)
    study = _study(sessions)
    assert (study.state, study.completion_count) == (StudyState.COMPLETE, 1)


def test_an_annotation_is_ready_once_its_study_is_complete(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        stored = lifecycle.create_annotation(session, _roi(), source="rest", now=T0)
    assert stored.created
    assert _annotation(sessions, stored.id).state is AnnotationState.PENDING

    def ready(
        at: datetime, *, stale_after_s: float | None = None, unreceived: bool = False
    ) -> list[int]:
        with sessions() as session:
            return lifecycle.ready_annotation_ids(
                session, now=at, stale_after_s=stale_after_s, include_unreceived=unreceived
            )

    assert ready(T0) == []  # the study was never received
    assert ready(T0, unreceived=True) == [stored.id]  # a DICOMweb source would provide it
    _receive(sessions, T0)
    assert ready(T0, unreceived=True) == []  # receiving: not ready, whatever the source
    _complete(sessions, T0 + timedelta(seconds=30))
    assert ready(T0 + timedelta(seconds=30)) == [stored.id]

    with transaction(sessions) as session:
        lifecycle.mark_annotations_enqueued(session, [stored.id], T0 + timedelta(seconds=30))
    assert ready(T0 + timedelta(seconds=31)) == []  # its message is on its way
    assert ready(T0 + timedelta(seconds=40), stale_after_s=60) == []
    assert ready(T0 + timedelta(seconds=91), stale_after_s=60) == [stored.id]  # lost?
    with transaction(sessions) as session:
        lifecycle.clear_annotation_marks(session, [stored.id])
    assert ready(T0 + timedelta(seconds=31)) == [stored.id]


def test_the_same_source_object_is_one_annotation(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        first = lifecycle.create_annotation(
            session, _roi(), source="sr", source_key="sr:1.2.3", annotator="Dr A", now=T0
        )
        again = lifecycle.create_annotation(
            session, _roi(), source="sr", source_key="sr:1.2.3", now=T0
        )
    assert first.created and not again.created and again.id == first.id
    assert _annotation(sessions, first.id).roi() == _roi()
    assert _annotation(sessions, first.id).annotator == "Dr A"


def _claimable_annotation(sessions: sessionmaker[Session]) -> int:
    _receive(sessions, T0)
    _complete(sessions, T0 + timedelta(seconds=30))
    with transaction(sessions) as session:
        return lifecycle.create_annotation(session, _roi(), source="rest", now=T0).id


def _claim(
    sessions: sessionmaker[Session], annotation_id: int, worker: str, at: datetime
) -> lifecycle.Claim | None:
    with transaction(sessions) as session:
        return lifecycle.claim_annotation(
            session, annotation_id, worker_id=worker, now=at, lease_s=LEASE_S
        )


def test_one_worker_holds_a_claim_until_its_lease_expires(
    sessions: sessionmaker[Session],
) -> None:
    annotation_id = _claimable_annotation(sessions)
    at = T0 + timedelta(minutes=1)
    assert _claim(sessions, annotation_id, "w1", at) == lifecycle.Claim(annotation_id, 1)
    row = _annotation(sessions, annotation_id)
    assert (row.state, row.claimed_by) == (AnnotationState.PROCESSING, "w1")
    assert _claim(sessions, annotation_id, "w2", at + timedelta(seconds=59)) is None

    takeover = _claim(sessions, annotation_id, "w2", at + timedelta(seconds=60))
    assert takeover == lifecycle.Claim(annotation_id, 2)
    with sessions() as session:
        assert not lifecycle.holds_claim(session, annotation_id, "w1")
        assert lifecycle.holds_claim(session, annotation_id, "w2")
    with transaction(sessions) as session:  # the old worker's release changes nothing
        lifecycle.release_annotation(
            session, annotation_id, worker_id="w1", reason="late", now=at + timedelta(seconds=61)
        )
    assert _annotation(sessions, annotation_id).claimed_by == "w2"

    with transaction(sessions) as session:
        lifecycle.complete_annotation(session, annotation_id, now=at + timedelta(seconds=62))
    row = _annotation(sessions, annotation_id)
    assert (row.state, row.claimed_by, row.claimed_until) == (AnnotationState.DONE, None, None)
    assert _claim(sessions, annotation_id, "w3", at + timedelta(hours=1)) is None  # done is done


def test_released_work_is_pending_again_and_failed_work_waits_for_a_retry(
    sessions: sessionmaker[Session],
) -> None:
    annotation_id = _claimable_annotation(sessions)
    at = T0 + timedelta(minutes=1)
    _claim(sessions, annotation_id, "w1", at)
    with transaction(sessions) as session:
        lifecycle.release_annotation(
            session, annotation_id, worker_id="w1", reason="PACS busy", now=at
        )
    row = _annotation(sessions, annotation_id)
    assert (row.state, row.failure_reason, row.enqueued_at) == (
        AnnotationState.PENDING,
        "PACS busy",
        at,
    )
    assert _claim(sessions, annotation_id, "w2", at) == lifecycle.Claim(annotation_id, 2)

    with transaction(sessions) as session:
        lifecycle.fail_annotation(
            session, annotation_id, worker_id="w2", reason="no such series", now=at
        )
    row = _annotation(sessions, annotation_id)
    assert (row.state, row.failure_reason) == (AnnotationState.FAILED, "no such series")
    assert _claim(sessions, annotation_id, "w3", at + timedelta(hours=1)) is None

    with transaction(sessions) as session:
        assert lifecycle.retry_failed_annotations(session, None, now=at) == [annotation_id]
        assert lifecycle.retry_failed_annotations(session, None, now=at) == []
    row = _annotation(sessions, annotation_id)
    assert (row.state, row.attempts, row.enqueued_at) == (AnnotationState.PENDING, 0, None)
    assert _claim(sessions, annotation_id, "w3", at) == lifecycle.Claim(annotation_id, 1)


def _result(sessions: sessionmaker[Session], annotation_id: int) -> int:
    with transaction(sessions) as session:
        result = TriageResult(
            annotation_id=annotation_id,
            model_name="m",
            model_version="1",
            patient_probability=0.9,
            slice_x_mm=[0.0],
            slice_probabilities=[0.9],
            label="malignant",
            priority="HIGH",
            threshold=0.5,
            sr_series_instance_uid="1.2.3.1",
            sr_sop_instance_uid="1.2.3.2",
            sr_path="sr.dcm",
            created_at=T0,
        )
        session.add(result)
        session.flush()
        return result.id


def _delivery(sessions: sessionmaker[Session], delivery_id: int) -> Delivery:
    with sessions() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        return row


def _jobs(sessions: sessionmaker[Session]) -> dict[str, AutoJob]:
    with sessions() as session:
        return {job.study_instance_uid: job for job in session.scalars(select(AutoJob))}


def _create_jobs(sessions: sessionmaker[Session], policy: str, at: datetime) -> list[int]:
    with transaction(sessions) as session:
        return lifecycle.create_auto_jobs(
            session,
            policy=policy,
            fallback_s=120.0,
            now=at,  # type: ignore[arg-type]
        )


def test_policy_always_makes_one_automatic_job_per_complete_study_ever(
    sessions: sessionmaker[Session],
) -> None:
    other = "1.2.826.0.1.3680043.8.498.102"
    _receive(sessions, T0)
    _receive(sessions, T0 + timedelta(seconds=25), other)
    assert _create_jobs(sessions, "always", T0 + timedelta(seconds=10)) == []  # still receiving
    _complete(sessions, T0 + timedelta(seconds=40))  # STUDY complete, ``other`` not yet
    assert len(_create_jobs(sessions, "always", T0 + timedelta(seconds=40))) == 1
    assert set(_jobs(sessions)) == {STUDY}
    _complete(sessions, T0 + timedelta(seconds=60))
    assert len(_create_jobs(sessions, "always", T0 + timedelta(seconds=60))) == 1
    # A late instance reopens the study; completing again makes no second job.
    _receive(sessions, T0 + timedelta(seconds=70))
    _complete(sessions, T0 + timedelta(seconds=110))
    assert _create_jobs(sessions, "always", T0 + timedelta(seconds=110)) == []
    assert len(_jobs(sessions)) == 2
    assert _create_jobs(sessions, "off", T0 + timedelta(seconds=110)) == []


def test_policy_fallback_waits_for_a_reader_and_policy_off_never_analyses(
    sessions: sessionmaker[Session],
) -> None:
    read = "1.2.826.0.1.3680043.8.498.103"
    for study in (STUDY, read):
        _receive(sessions, T0, study)
    _complete(sessions, T0 + timedelta(seconds=30))
    with transaction(sessions) as session:
        lifecycle.create_annotation(session, _roi(read), source="rest", now=T0)
    assert _create_jobs(sessions, "off", T0 + timedelta(hours=1)) == []
    # Within the fallback period: nothing yet.
    assert _create_jobs(sessions, "fallback", T0 + timedelta(seconds=100)) == []
    # After it: only the study no reader annotated.
    assert len(_create_jobs(sessions, "fallback", T0 + timedelta(seconds=151))) == 1
    assert set(_jobs(sessions)) == {STUDY}


def test_an_automatic_job_is_claimed_with_a_lease_and_ends_unanalysable_or_done(
    sessions: sessionmaker[Session],
) -> None:
    _receive(sessions, T0)
    _complete(sessions, T0 + timedelta(seconds=30))
    (job_id,) = _create_jobs(sessions, "always", T0 + timedelta(seconds=30))
    now = T0 + timedelta(seconds=31)
    with transaction(sessions) as session:
        assert lifecycle.ready_auto_job_ids(session, now=now, stale_after_s=None) == [job_id]
        lifecycle.mark_auto_jobs_enqueued(session, [job_id], now)
        assert lifecycle.ready_auto_job_ids(session, now=now, stale_after_s=None) == []
        claim = lifecycle.claim_auto_job(session, job_id, worker_id="a", now=now, lease_s=LEASE_S)
        assert claim is not None and claim.attempt == 1
        assert (
            lifecycle.claim_auto_job(session, job_id, worker_id="b", now=now, lease_s=LEASE_S)
            is None
        )
    later = now + timedelta(seconds=LEASE_S + 1)
    with transaction(sessions) as session:  # the lease expired: another worker takes it over
        taken = lifecycle.claim_auto_job(session, job_id, worker_id="b", now=later, lease_s=LEASE_S)
        assert taken is not None and taken.attempt == 2
        assert not lifecycle.holds_auto_job(session, job_id, "a")
        # The first worker's late verdict changes nothing; the holder's does.
        for worker in ("a", "b"):
            lifecycle.auto_job_unanalysable(
                session,
                job_id,
                worker_id=worker,
                reason=f"no spine in the field of view ({worker})",
                series_instance_uid=SERIES,
                localiser="localiser 1",
                now=later,
            )
    job = _jobs(sessions)[STUDY]
    assert job.state is AutoJobState.UNANALYSABLE
    assert job.unanalysable_reason == "no spine in the field of view (b)"
    assert job.claimed_by is None and job.series_instance_uid == SERIES


def test_proposed_bodies_are_done_annotations_of_the_job_and_never_claimed(
    sessions: sessionmaker[Session],
) -> None:
    _receive(sessions, T0)
    _complete(sessions, T0 + timedelta(seconds=30))
    (job_id,) = _create_jobs(sessions, "always", T0 + timedelta(seconds=30))
    now = T0 + timedelta(seconds=31)
    bodies = [lifecycle.ProposedBody(_roi(), 0.8), lifecycle.ProposedBody(_roi(), 0.6)]
    with transaction(sessions) as session:
        ids = lifecycle.propose_bodies(session, job_id, bodies, annotator="loc 1", now=now)
        assert lifecycle.propose_bodies(session, job_id, bodies, annotator="loc 1", now=now) == ids
        assert lifecycle.ready_annotation_ids(session, now=now, stale_after_s=None) == []
    for annotation_id in ids:
        annotation = _annotation(sessions, annotation_id)
        assert annotation.state is AnnotationState.DONE and annotation.source == "auto"
        assert annotation.auto_job_id == job_id and annotation.annotator == "loc 1"
    assert _annotation(sessions, ids[0]).confidence == pytest.approx(0.8)


def test_deliveries_are_due_claimed_retried_and_delivered(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    result_id = _result(sessions, _claimable_annotation(sessions))
    destinations = [
        FolderDestination(name="copy", path=tmp_path, max_attempts=2),
        FolderDestination(name="audit", path=tmp_path),
    ]
    with transaction(sessions) as session:
        created = lifecycle.create_deliveries(session, result_id, destinations, now=T0)
        assert lifecycle.create_deliveries(session, result_id, destinations, now=T0) == []
    assert len(created) == 2
    copy, audit = created

    def due(at: datetime) -> list[int]:
        with sessions() as session:
            return lifecycle.due_delivery_ids(session, now=at, stale_after_s=60)

    def claim(delivery_id: int, at: datetime) -> lifecycle.DeliveryClaim | None:
        with transaction(sessions) as session:
            return lifecycle.claim_delivery(session, delivery_id, now=at, lease_s=LEASE_S)

    assert sorted(due(T0)) == sorted(created)
    first = claim(copy, T0)
    assert first is not None and (first.attempt, first.destination) == (1, "copy")
    assert not first.is_last_attempt
    assert claim(copy, T0) is None  # being sent
    assert due(T0) == [audit]

    retry_at = T0 + timedelta(seconds=30)
    with transaction(sessions) as session:
        lifecycle.delivery_attempt_failed(session, copy, reason="refused", retry_at=retry_at)
    assert (_delivery(sessions, copy).state, _delivery(sessions, copy).last_error) == (
        DeliveryState.PENDING,
        "refused",
    )
    assert copy not in due(T0 + timedelta(seconds=29))
    second = claim(copy, retry_at)
    assert second is not None and second.attempt == 2 and second.is_last_attempt
    with transaction(sessions) as session:
        lifecycle.delivery_attempt_failed(session, copy, reason="refused again", retry_at=None)
    assert _delivery(sessions, copy).state is DeliveryState.FAILED
    assert copy not in due(T0 + timedelta(days=1))
    with transaction(sessions) as session:
        assert lifecycle.retry_failed_deliveries(session, [copy], now=T0) == [copy]
    row = _delivery(sessions, copy)
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)

    sending = claim(audit, T0)
    assert sending is not None
    assert audit in due(T0 + timedelta(seconds=LEASE_S))  # the sender's lease expired
    with transaction(sessions) as session:
        lifecycle.delivery_sent(session, audit, now=T0 + timedelta(seconds=1))
    row = _delivery(sessions, audit)
    assert (row.state, row.delivered_at) == (DeliveryState.DELIVERED, T0 + timedelta(seconds=1))
    assert audit not in due(T0 + timedelta(days=1))


def test_backoff_doubles_with_jitter_up_to_its_ceiling() -> None:
    import random

    rng = random.Random(1)
    for attempt, ceiling in ((1, 5.0), (2, 10.0), (3, 20.0), (9, 300.0)):
        delays = [lifecycle.backoff_s(attempt, base_s=5, max_s=300, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)


# --- the rule itself: nobody else writes a state column --------------------------------------

STATE_COLUMNS = {"state"}


def _writes_state(node: ast.AST) -> bool:
    """``x.state = ...``, ``values(state=...)`` or a model built with ``state=``."""
    if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Attribute) and t.attr in STATE_COLUMNS for t in targets)
    if isinstance(node, ast.Call):
        return any(keyword.arg in STATE_COLUMNS for keyword in node.keywords)
    return False


def test_only_the_lifecycle_module_writes_a_state_column() -> None:
    offenders = []
    for package in ("dicom_node", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "dicom_node" / "archive" / "lifecycle.py":
                continue
            tree = ast.parse(path.read_text())
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if _writes_state(node)
            ]
    assert offenders == []
