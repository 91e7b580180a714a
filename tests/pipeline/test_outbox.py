"""The outbox: backoff with jitter on transient failures, failed after max attempts or a
permanent refusal (visible in the CLI), re-sent by ``deliveries retry``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from dicom_node.archive.db import transaction
from dicom_node.archive.lifecycle import create_deliveries
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    TriageResult,
)
from dicom_node.settings import Settings
from tests.support import free_port
from worker.cli import main
from worker.delivery import DeliveryOutcome, run_delivery
from worker.runtime import WorkerRuntime


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> WorkerRuntime:
    upgrade(database_url)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=database_url,
        delivery_backoff_s=10.0,
        delivery_backoff_max_s=60.0,
        destinations=[
            # nothing listens on this port: a transient failure every time
            {
                "name": "ris",
                "kind": "hl7",
                "host": "127.0.0.1",
                "port": free_port(),
                "max_attempts": 2,
                "timeout_s": 2,
            },
            # a folder below a regular file: refused for good
            {"name": "copy", "kind": "folder", "path": str(blocker / "results")},
        ],
    )
    rt = WorkerRuntime.from_settings(settings)
    sr = rt.store.root / "sr.dcm"
    sr.write_bytes(b"DICM")
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        annotation = RoiAnnotation(
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.4",
            slices_x_mm=[0.0],
            polygon_yz_mm=[[0, 0], [1, 0], [1, 1]],
            source="rest",
            state=AnnotationState.DONE,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        session.add(annotation)
        session.flush()
        result = TriageResult(
            annotation_id=annotation.id,
            model_name="m",
            model_version="1",
            patient_probability=0.9,
            slice_x_mm=[0.0],
            slice_probabilities=[0.9],
            label="malignant",
            priority="HIGH",
            threshold=0.5,
            demonstration_model=False,
            sr_series_instance_uid="1.2.5",
            sr_sop_instance_uid="1.2.6",
            sr_path="sr.dcm",
            timings={},
            created_at=now,
        )
        session.add(result)
        session.flush()
        create_deliveries(session, result.id, settings.destinations, now=now)
    yield rt
    rt.close()


def _delivery(rt: WorkerRuntime, name: str) -> Delivery:
    with rt.sessions() as session:
        return session.scalars(select(Delivery).where(Delivery.destination == name)).one()


def _make_due(rt: WorkerRuntime, delivery_id: int) -> None:
    with transaction(rt.sessions) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_transient_failures_back_off_then_fail_and_can_be_retried(
    runtime: WorkerRuntime, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ris = _delivery(runtime, "ris")
    first = run_delivery(runtime, ris.id)
    assert first.outcome is DeliveryOutcome.RETRY
    assert first.retry_at is not None
    delay = (first.retry_at - datetime.now(UTC)).total_seconds()
    assert 4.0 <= delay <= 10.5  # jitter within [½, 1] × the first backoff step
    assert run_delivery(runtime, ris.id).outcome is DeliveryOutcome.SKIPPED  # not due yet
    _make_due(runtime, ris.id)
    assert run_delivery(runtime, ris.id).outcome is DeliveryOutcome.FAILED  # max_attempts 2
    failed = _delivery(runtime, "ris")
    assert failed.state is DeliveryState.FAILED and failed.attempts == 2
    assert failed.last_error

    monkeypatch.setenv("SPINE_TRIAGE_DATABASE_URL", runtime.settings.resolved_database_url)
    assert main(["deliveries", "list", "--state", "failed"]) == 0
    assert "ris" in capsys.readouterr().out
    assert main(["deliveries", "retry", str(ris.id)]) == 0
    again = _delivery(runtime, "ris")
    assert again.state is DeliveryState.PENDING and again.attempts == 0


def test_permanent_refusal_fails_at_once(runtime: WorkerRuntime) -> None:
    copy = _delivery(runtime, "copy")
    outcome = run_delivery(runtime, copy.id)
    assert outcome.outcome is DeliveryOutcome.FAILED
    assert _delivery(runtime, "copy").attempts == 1
