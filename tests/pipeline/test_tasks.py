"""The worker's tasks: one automatic job at a time per worker process, while reader-ROI jobs
and deliveries still run beside it; a second automatic job goes back to the broker instead of
holding a thread, and the slot's next holder runs the oldest waiting jobs first."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import Retry

from dicom_node.archive import lifecycle
from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AutoJob, AutoJobState, Study, StudyState
from worker import tasks
from worker.automatic import AutomaticOutcome
from worker.pipeline import Outcome


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[str, int] = {"automatic": 0, "reader": 0}
        self.overlap: list[tuple[int, int]] = []

    def run(self, kind: str, job_id: int, result: Any) -> Any:
        with self.lock:
            self.active[kind] += 1
            self.overlap.append((self.active["automatic"], self.active["reader"]))
        time.sleep(0.3)
        with self.lock:
            self.active[kind] -= 1
        return result


def test_automatic_jobs_run_one_at_a_time_beside_reader_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(tasks, "get_runtime", lambda: None)
    monkeypatch.setattr(tasks, "run_older_first", lambda rt, job_id: [])
    monkeypatch.setattr(
        tasks,
        "run_automatic",
        lambda rt, job_id: recorder.run(
            "automatic", job_id, AutomaticOutcome(Outcome.DONE, job_id)
        ),
    )

    class _Triage:
        outcome = Outcome.DONE
        retry_in_s = None

    monkeypatch.setattr(
        tasks,
        "run_triage",
        lambda rt, annotation_id: recorder.run("reader", annotation_id, _Triage),
    )
    first = threading.Thread(target=tasks.triage_study, args=(1,))
    first.start()
    while recorder.active["automatic"] == 0:
        time.sleep(0.01)
    reader_job = threading.Thread(target=tasks.triage_annotation, args=(9,))
    reader_job.start()
    # A second automatic job does not hold a thread waiting for the slot (the running job's
    # deliveries would wait behind it): it goes back to the broker at once, to come again.
    begin = time.perf_counter()
    with pytest.raises(Retry):
        tasks.triage_study(2)
    assert time.perf_counter() - begin < 0.1
    for thread in (first, reader_job):
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert tasks.triage_study(3) == Outcome.DONE.value  # the slot is free again
    assert max(automatic for automatic, _ in recorder.overlap) == 1
    # the reader-ROI job started while an automatic job was running
    assert any(automatic == 1 and reader == 1 for automatic, reader in recorder.overlap)


def test_the_slot_holder_runs_the_oldest_waiting_studies_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages come back from the broker in no particular order; whichever gets the slot,
    the studies are analysed in the order they completed. A job that failed before keeps
    its own back-off and is not run ahead."""
    url = f"sqlite:///{tmp_path / 'order.db'}"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        for k in range(5):
            at = now - timedelta(seconds=60 - k)
            session.add(
                Study(
                    study_instance_uid=f"1.2.3.{k}",
                    state=StudyState.COMPLETE,
                    instance_count=1,
                    first_received_at=at,
                    last_received_at=at,
                    completed_at=at,
                )
            )
        session.flush()
        ids = lifecycle.create_auto_jobs(session, policy="always", fallback_s=0, now=now)
    assert len(ids) == 5
    with transaction(sessions) as session:  # the second study's job failed once already
        retried = session.get(AutoJob, ids[1])
        assert retried is not None
        retried.attempts = 1
    rt = SimpleNamespace(sessions=sessions, worker_id="w1", settings=SimpleNamespace())
    ran: list[int] = []

    def run(rt: Any, job_id: int) -> AutomaticOutcome:
        with transaction(sessions) as session:
            claim = lifecycle.claim_auto_job(session, job_id, worker_id="w1", now=now, lease_s=60)
        if claim is None:
            return AutomaticOutcome(Outcome.SKIPPED, job_id)
        ran.append(job_id)
        return AutomaticOutcome(Outcome.DONE, job_id)

    monkeypatch.setattr(tasks, "get_runtime", lambda: rt)
    monkeypatch.setattr(tasks, "run_automatic", run)
    # The youngest study's message came back first: the three older never-tried jobs first.
    assert tasks.triage_study(ids[4]) == Outcome.DONE.value
    assert ran == [ids[0], ids[2], ids[3], ids[4]]
    # Their own messages then find nothing to do; the retried job runs under its own.
    for job_id in (ids[2], ids[0], ids[3]):
        assert tasks.triage_study(job_id) == Outcome.SKIPPED.value
    assert tasks.triage_study(ids[1]) == Outcome.DONE.value
    assert ran[-1] == ids[1]
    with sessions() as session:
        assert {job.state for job in session.query(AutoJob)} == {AutoJobState.PROCESSING}


def test_a_task_retries_as_often_as_its_job_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries are unbounded: a message past Celery's default of three retries goes back to
    the broker again instead of being dropped (it would then wait for the node's sweep)."""
    from worker.delivery import DeliveryOutcome, DeliveryResult
    from worker.pipeline import TriageOutcome

    monkeypatch.setattr(tasks, "get_runtime", lambda: None)
    monkeypatch.setattr(
        tasks,
        "run_triage",
        lambda rt, annotation_id: TriageOutcome(Outcome.RETRY, annotation_id, retry_in_s=5.0),
    )
    monkeypatch.setattr(
        tasks,
        "run_delivery",
        lambda rt, delivery_id: DeliveryResult(
            DeliveryOutcome.RETRY, delivery_id, retry_at=datetime.now(UTC) + timedelta(seconds=5)
        ),
    )
    assert tasks.AUTOMATIC_SLOTS.acquire(blocking=False)  # another automatic job is running
    try:
        for task, argument in (
            (tasks.triage_study, 2),
            (tasks.triage_annotation, 3),
            (tasks.deliver, 4),
        ):
            with pytest.raises(Retry):
                task.apply(args=(argument,), retries=10, throw=True)
    finally:
        tasks.AUTOMATIC_SLOTS.release()
