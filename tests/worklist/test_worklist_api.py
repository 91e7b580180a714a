"""GET /worklist and /worklist/{uid}: reading order, filters, fields, against the real app."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event

from dicom_node.archive.db import transaction
from dicom_node.archive.schema import AnnotationState, DeliveryState, StudyState
from tests.worklist.conftest import WorklistService
from tests.worklist.rows import Seeder


def _worklist(service: WorklistService, **params: Any) -> dict[str, Any]:
    response = service.client.get("/worklist", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _seed_mixed(service: WorklistService) -> dict[str, str]:
    """One study of every kind; returns their UIDs by a name that says what each is."""
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        uids = {
            "flagged_low": seed.study(name="LOW^FLAG", minute=0),
            "flagged_high": seed.study(name="HIGH^FLAG", minute=5),
            "routine_low": seed.study(name="LOW^ROUTINE", minute=1),
            "routine_high": seed.study(name="HIGH^ROUTINE", minute=2),
            "pending": seed.study(name="PENDING^ROI", minute=3),
            "processing": seed.study(name="BUSY^ROI", minute=4),
            "receiving": seed.study(name="STILL^ARRIVING", state=StudyState.RECEIVING, minute=6),
            "failed": seed.study(name="FAILED^JOB", minute=7),
            "no_roi": seed.study(name="NO^ROI", minute=8),
        }
        seed.done(uids["flagged_low"], (0.2, 0.61, 0.55))
        seed.done(uids["flagged_high"], (0.97, 0.4, 0.8))
        seed.done(uids["routine_low"], (0.05, 0.1, 0.02))
        seed.done(uids["routine_high"], (0.3, 0.45, 0.2))
        seed.annotation(uids["pending"], minute=9)
        seed.annotation(uids["processing"], state=AnnotationState.PROCESSING, minute=8)
        seed.annotation(
            uids["failed"],
            state=AnnotationState.FAILED,
            failure_reason="series does not meet the selection rule 'Modality=CT'",
        )
        roi_only = "1.2.826.0.1.3680043.8.498.99.1"
        seed.annotation(roi_only, minute=10)
        uids["roi_only"] = roi_only
    return uids


def test_reading_order_flagged_by_probability_then_waiting_routine_failed_awaiting(
    service: WorklistService,
) -> None:
    uids = _seed_mixed(service)
    body = _worklist(service)
    order = [item["study_instance_uid"] for item in body["items"]]
    states = [item["state"] for item in body["items"]]
    expected = ["flagged"] * 2 + ["waiting"] * 4 + ["routine"] * 2 + ["failed", "awaiting_roi"]
    assert states == expected
    assert order[:2] == [uids["flagged_high"], uids["flagged_low"]]
    assert order[6:] == [uids["routine_high"], uids["routine_low"], uids["failed"], uids["no_roi"]]
    # Waiting: the longest waiting first (ROI time, or receipt time when there is no ROI).
    assert order[2:6] == [uids["receiving"], uids["processing"], uids["pending"], uids["roi_only"]]
    assert body["counts"] == {
        "flagged": 2,
        "waiting": 4,
        "routine": 2,
        "failed": 1,
        "not_analysed": 0,
        "awaiting_roi": 1,
    }
    assert body["total"] == 10
    by_uid = {item["study_instance_uid"]: item for item in body["items"]}
    failed = by_uid[uids["failed"]]
    assert "selection rule" in failed["failure_reason"] and "selection rule" in failed["activity"]
    assert by_uid[uids["roi_only"]]["study_state"] == "not received"
    assert by_uid[uids["roi_only"]]["patient_name"] is None
    assert by_uid[uids["processing"]]["activity"] == "processing"
    assert by_uid[uids["receiving"]]["activity"] == "receiving images"


def test_item_carries_patient_model_result_and_delivery_summary(service: WorklistService) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        study = seed.study(name="ROE^ANNA^M", patient_id="PID-42", accession="ACC42")
        result_id = seed.done(
            study, (0.7, 0.9, 0.6), demonstration=True, preview_path="previews/x.png"
        )
        seed.delivery(result_id, "pacs", DeliveryState.DELIVERED)
        seed.delivery(result_id, "ris", DeliveryState.FAILED, kind="hl7", last_error="AE")
        seed.delivery(result_id, "hook", DeliveryState.PENDING, kind="webhook")
    [item] = _worklist(service)["items"]
    assert item["patient_name"] == "ROE^ANNA^M"
    assert item["patient_id"] == "PID-42"
    assert item["accession_number"] == "ACC42"
    assert item["study_date"] == "2026-03-02"
    assert item["state"] == "flagged"
    assert item["probability"] == 0.9
    assert (item["label"], item["priority"], item["threshold"]) == ("malignant", "HIGH", 0.5)
    assert item["model"] == {
        "name": "li2021-resnet50",
        "version": "1.0.0",
        "sha256": None,  # a row seeded without its checkpoint's sha256
        "demonstration": True,
    }
    assert item["result_id"] == result_id
    assert item["preview_url"] == f"/results/{result_id}/preview.png"
    assert item["deliveries"] == {
        "total": 3,
        "delivered": 1,
        "pending": 1,
        "sending": 0,
        "failed": 1,
    }
    assert item["received_at"].startswith("2026-03-02T08:00:00")
    assert item["annotation_id"] is not None and item["result_at"] is not None


def test_newest_annotation_and_newest_result_decide(service: WorklistService) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        reannotated = seed.study()
        seed.done(reannotated, (0.99,))  # an old flag ...
        seed.annotation(reannotated, minute=30)  # ... superseded by a new ROI being processed
        upgraded = seed.study()
        annotation = seed.annotation(upgraded, state=AnnotationState.DONE)
        seed.result(annotation, (0.2,), model_version="1.0.0")
        seed.result(annotation, (0.8,), model_version="2.0.0")  # a newer model flags it
    by_uid = {item["study_instance_uid"]: item for item in _worklist(service)["items"]}
    assert by_uid[reannotated]["state"] == "waiting"
    assert by_uid[reannotated]["probability"] is None
    assert by_uid[upgraded]["state"] == "flagged"
    assert by_uid[upgraded]["model"]["version"] == "2.0.0"


def test_state_and_date_filters(service: WorklistService) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        march = seed.study(study_date="20260301", minute=0)
        april = seed.study(study_date="20260415", minute=0)
        undated = seed.study(study_date=None, minute=60 * 24 * 3)  # received 2026-03-05
        seed.done(march, (0.9,))
        seed.done(april, (0.1,))
        seed.annotation(undated, state=AnnotationState.FAILED, failure_reason="bad")

    def uids(**params: Any) -> set[str]:
        return {item["study_instance_uid"] for item in _worklist(service, **params)["items"]}

    assert uids(state="flagged") == {march}
    assert uids(state="routine,failed") == {april, undated}
    assert uids(since="2026-03-02") == {april, undated}
    assert uids(until="2026-03-04") == {march}
    assert uids(since="2026-03-05", until="2026-03-05") == {undated}
    # On the date received, all three arrived in early March.
    assert uids(date_basis="received", until="2026-03-02") == {march, april}
    assert uids(date_basis="received", since="2026-03-05") == {undated}
    # Counts are per state after the date filter, before the state filter.
    body = _worklist(service, state="flagged", since="2026-03-01", until="2026-03-31")
    assert body["counts"]["flagged"] == 1 and body["counts"]["failed"] == 1
    assert body["counts"]["routine"] == 0 and body["total"] == 1
    bad = service.client.get("/worklist", params={"state": "urgent"})
    assert bad.status_code == 422 and "awaiting_roi" in bad.text
    assert service.client.get("/worklist", params={"since": "March"}).status_code == 422
    assert _worklist(service, limit=2)["total"] == 3
    assert len(_worklist(service, limit=2)["items"]) == 2


def test_detail_has_slices_threshold_roi_deliveries_and_history(service: WorklistService) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        study = seed.study()
        first = seed.annotation(study, state=AnnotationState.FAILED, failure_reason="no series")
        annotation = seed.annotation(study, state=AnnotationState.DONE, minute=5)
        result_id = seed.result(
            annotation,
            (0.3, 0.72, 0.41),
            threshold=0.6,
            slices_x_mm=(-12.5, -9.5, -6.5),
            preview_path="previews/1.png",
        )
        seed.delivery(result_id, "pacs", DeliveryState.FAILED, last_error="association rejected")
    response = service.client.get(f"/worklist/{study}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["state"] == "flagged"
    assert detail["threshold"] == 0.6
    assert detail["slices"] == [
        {"x_mm": -12.5, "probability": 0.3},
        {"x_mm": -9.5, "probability": 0.72},
        {"x_mm": -6.5, "probability": 0.41},
    ]
    assert detail["roi"]["slices_x_mm"] == [-3.0, 0.0, 3.0]
    assert len(detail["roi"]["polygon_yz_mm"]) == 4 and detail["roi"]["vertebra"] == "L1"
    assert detail["preview_url"] == f"/results/{result_id}/preview.png"
    [delivery] = detail["delivery_list"]
    assert delivery["destination"] == "pacs" and delivery["state"] == "failed"
    assert delivery["last_error"] == "association rejected"
    assert [a["id"] for a in detail["annotations"]] == [annotation, first]
    assert detail["timings"]["inference_s"] == 0.2
    assert service.client.get("/worklist/1.2.3.4.5").status_code == 404


def test_worklist_of_thousands_takes_few_queries_and_little_time(
    sqlite_service: WorklistService,
) -> None:
    service = sqlite_service
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        for i in range(1500):
            study = seed.study(patient_id=f"P{i}", minute=i)
            if i % 3 == 0:
                result_id = seed.done(study, ((i % 100) / 100.0,))
                seed.delivery(result_id, "pacs", DeliveryState.DELIVERED)
            elif i % 3 == 1:
                seed.annotation(study)
    statements: list[str] = []
    engine = service.sessions.kw["bind"]

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", record)
    try:
        start = time.perf_counter()
        body = _worklist(service)
        elapsed = time.perf_counter() - start
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert body["total"] == 1500
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) <= 5, selects
    probabilities = [i["probability"] for i in body["items"] if i["state"] == "flagged"]
    assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == 250
    assert elapsed < 3.0, f"worklist of 1500 studies took {elapsed:.2f} s"


def test_preview_png_is_served_from_storage_and_404_otherwise(service: WorklistService) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    (service.storage / "previews").mkdir(parents=True, exist_ok=True)
    (service.storage / "previews" / "a.png").write_bytes(png)
    outside = service.storage.parent / "secret.png"
    outside.write_bytes(png)
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        served = seed.done(seed.study(), (0.9,), preview_path="previews/a.png")
        missing_file = seed.done(seed.study(), (0.9,), preview_path="previews/gone.png")
        no_preview = seed.done(seed.study(), (0.1,))
        escaping = seed.done(seed.study(), (0.1,), preview_path="../secret.png")
    response = service.client.get(f"/results/{served}/preview.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == png
    for result_id in (missing_file, no_preview, escaping, 999_999):
        assert service.client.get(f"/results/{result_id}/preview.png").status_code == 404


def test_page_and_its_assets_are_served_with_a_same_origin_policy(
    sqlite_service: WorklistService,
) -> None:
    page = sqlite_service.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "DEMONSTRATION MODEL" in page.text
    for asset in ("/static/worklist.js", "/static/worklist.css"):
        assert sqlite_service.client.get(asset).status_code == 200
    # Nothing on the page is fetched from another origin (the node may be offline).
    assert "http://" not in page.text and "https://" not in page.text
