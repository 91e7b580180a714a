"""GET /metrics: node counters and database-derived metrics, parsed as Prometheus text."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.schema import AnnotationState, DeliveryState, StudyState
from dicom_node.web.app import ApiState, create_app
from dicom_node.web.metrics import count_instance_received
from tests.worklist.conftest import WorklistService, make_settings
from tests.worklist.rows import Seeder


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_database_metrics_count_jobs_deliveries_and_inference_time(
    service: WorklistService,
) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        a, b, c = seed.study(), seed.study(), seed.study(state=StudyState.RECEIVING)
        high = seed.done(a, (0.9,), inference_s=0.07)
        routine = seed.done(b, (0.1,), inference_s=0.3)
        seed.annotation(c)
        seed.annotation(c, state=AnnotationState.FAILED, failure_reason="x")
        seed.delivery(high, "pacs", DeliveryState.DELIVERED)
        seed.delivery(high, "ris", DeliveryState.FAILED, kind="hl7")
        seed.delivery(routine, "pacs", DeliveryState.PENDING)
    samples = _samples(service.client)

    assert samples[("spine_triage_database_up", ())] == 1.0
    assert samples[("spine_triage_studies", (("state", "complete"),))] == 2
    assert samples[("spine_triage_studies", (("state", "receiving"),))] == 1
    jobs = {
        state.value: samples[("spine_triage_jobs", (("state", state.value),))]
        for state in AnnotationState
    }
    assert jobs == {"pending": 1, "processing": 0, "done": 2, "failed": 1}
    assert samples[("spine_triage_oldest_pending_job_age_seconds", ())] > 0
    assert samples[("spine_triage_results_total", (("priority", "HIGH"),))] == 1
    assert samples[("spine_triage_results_total", (("priority", "ROUTINE"),))] == 1

    def deliveries(state: str, destination: str, kind: str) -> float:
        key = (("destination", destination), ("kind", kind), ("state", state))
        return samples.get(("spine_triage_deliveries", key), 0.0)

    assert deliveries("delivered", "pacs", "cstore") == 1
    assert deliveries("pending", "pacs", "cstore") == 1
    assert deliveries("failed", "ris", "hl7") == 1
    assert deliveries("delivered", "ris", "hl7") == 0

    def bucket(le: str) -> float:
        return samples[("spine_triage_inference_seconds_bucket", (("le", le),))]

    assert bucket("0.05") == 0
    assert bucket("0.1") == 1  # 0.07 s
    assert bucket("0.25") == 1
    assert bucket("0.5") == 2  # 0.3 s
    assert bucket("+Inf") == 2
    assert samples[("spine_triage_inference_seconds_count", ())] == 2
    assert abs(samples[("spine_triage_inference_seconds_sum", ())] - 0.37) < 1e-9


def test_instance_counter_counts_instances_and_each_study_once(
    sqlite_service: WorklistService,
) -> None:
    before = _samples(sqlite_service.client)
    instances = before[("spine_triage_instances_received_total", ())]
    studies = before[("spine_triage_studies_received_total", ())]
    for _ in range(3):
        count_instance_received("1.2.826.0.1.3680043.8.498.55.1")
    count_instance_received("1.2.826.0.1.3680043.8.498.55.2")
    after = _samples(sqlite_service.client)
    assert after[("spine_triage_instances_received_total", ())] == instances + 4
    assert after[("spine_triage_studies_received_total", ())] == studies + 2
    # Process metrics come along (a restart shows as a new process start time).
    assert after[("spine_triage_process_start_time_seconds", ())] > 0


def test_scrape_answers_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    engine = make_engine(url)
    app = create_app(
        ApiState(
            settings=make_settings(tmp_path, url),
            sessions=make_session_factory(engine),
            send=None,
            token="secret",
        )
    )
    with TestClient(app) as client:
        samples = _samples(client)
    engine.dispose()
    assert samples[("spine_triage_database_up", ())] == 0.0
    assert ("spine_triage_instances_received_total", ()) in samples
    assert not any(name == "spine_triage_jobs" for name, _ in samples)


def test_counter_fed_by_the_real_ingest_path(sqlite_service: WorklistService) -> None:
    """``count_instance_received`` fits ``StoreContext.on_stored``: what the node wires."""
    from io import BytesIO

    from pydicom.uid import generate_uid

    from dicom_node.dicom.ingest import StoreContext, store_instance
    from dicom_node.dicom.storage import FileStore
    from tests.dicom_factory import ct_slice

    context = StoreContext(
        store=FileStore(sqlite_service.storage),
        sessions=sqlite_service.sessions,
        on_stored=count_instance_received,
    )
    before = _samples(sqlite_service.client)
    study, series = generate_uid(), generate_uid()
    for index in range(3):
        buffer = BytesIO()
        ct_slice(study_uid=study, series_uid=series, index=index).save_as(
            buffer, enforce_file_format=True
        )
        outcome = store_instance(context, buffer.getvalue(), transfer_syntax=None, source="TEST")
        assert outcome.ok, outcome.comment
    after = _samples(sqlite_service.client)
    for name, added in (("instances", 3), ("studies", 1)):
        key = (f"spine_triage_{name}_received_total", ())
        assert after[key] == before[key] + added
    assert after[("spine_triage_studies", (("state", "receiving"),))] == 1
