"""The worklist with automatic analysis: its result flags a study nobody has annotated, a
study that could not be analysed says why, and a reader's ROI and the automatic result are
both shown. Rows are written through the lifecycle, as the node and the workers write them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import AutoJob, TriageResult
from model.serving.roi import Roi
from tests.worklist.conftest import WorklistService
from tests.worklist.rows import BASE_TIME, Seeder, uid

NOW = BASE_TIME + timedelta(hours=1)


def _job(session: Session, study_uid: str) -> int:
    lifecycle.create_auto_jobs(session, policy="always", fallback_s=0.0, now=NOW)
    job_id = session.scalar(select(AutoJob.id).where(AutoJob.study_instance_uid == study_uid))
    assert job_id is not None
    claim = lifecycle.claim_auto_job(session, job_id, worker_id="w", now=NOW, lease_s=60)
    assert claim is not None
    return job_id


def _analysed(session: Session, study_uid: str, bodies: dict[str, float]) -> int:
    """An automatic job done with one body per ``{level: probability}``; returns its result."""
    job_id = _job(session, study_uid)
    series_uid = uid()
    proposed = [
        lifecycle.ProposedBody(
            Roi(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                slices_x_mm=(-6.0, -3.0, 0.0, 3.0, 6.0),
                polygon_yz_mm=((-20.0, 30.0 * i), (20.0, 30.0 * i), (20.0, 30.0 * i + 25.0)),
                vertebra=level,
            ),
            0.9,
        )
        for i, level in enumerate(sorted(bodies, key=lambda level: -bodies[level]))
    ]
    ids = lifecycle.propose_bodies(session, job_id, proposed, annotator="localiser 1", now=NOW)
    top = max(bodies.values())
    result = TriageResult(
        annotation_id=ids[0],
        auto_job_id=job_id,
        model_name="m",
        model_version="1",
        patient_probability=top,
        slice_x_mm=[0.0],
        slice_probabilities=[top],
        label="malignant" if top >= 0.5 else "benign",
        priority="HIGH" if top >= 0.5 else "ROUTINE",
        threshold=0.5,
        sr_series_instance_uid=uid(),
        sr_sop_instance_uid=uid(),
        sr_path="auto.dcm",
        timings={},
        bodies=[
            {"annotation_id": i, "vertebra": body.roi.vertebra, "probability": bodies[level]}
            for i, body, level in zip(
                ids, proposed, sorted(bodies, key=lambda v: -bodies[v]), strict=True
            )
        ],
        created_at=NOW,
    )
    session.add(result)
    session.flush()
    lifecycle.complete_auto_job(
        session, job_id, series_instance_uid=series_uid, localiser="localiser 1", now=NOW
    )
    return result.id


def _items(service: WorklistService) -> dict[str, dict[str, Any]]:
    response = service.client.get("/worklist")
    assert response.status_code == 200, response.text
    return {item["study_instance_uid"]: item for item in response.json()["items"]}


def test_an_automatic_flag_puts_an_unannotated_study_first_and_names_the_vertebra(
    service: WorklistService,
) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        flagged = seed.study(name="AUTO^FLAGGED", minute=1)
        _analysed(session, flagged, {"L2": 0.92, "L3": 0.1, "L1": 0.05})
        reader_routine = seed.study(name="READER^ROUTINE", minute=0)  # no automatic job
        seed.done(reader_routine, (0.2, 0.3))
    items = _items(service)
    order = list(items)
    assert order[0] == flagged
    item = items[flagged]
    assert item["state"] == "flagged" and item["source"] == "automatic"
    assert item["vertebra"] == "L2" and "on L2" in item["activity"]
    assert item["automatic"]["probability"] == 0.92 and item["reader"] is None
    assert items[reader_routine]["source"] == "reader"
    assert items[reader_routine]["automatic"] is None

    detail = service.client.get(f"/worklist/{flagged}").json()
    assert [body["vertebra"] for body in detail["bodies"]] == ["L2", "L3", "L1"]
    assert detail["roi"]["source"] == "auto" and detail["roi"]["vertebra"] == "L2"
    assert detail["annotations"] == []  # the bodies are the job's, not readers' ROIs


def test_a_study_that_could_not_be_analysed_says_why_and_is_not_flagged(
    service: WorklistService,
) -> None:
    with transaction(service.sessions) as session:
        head = Seeder(session).study(name="HEAD^CT")
        job_id = _job(session, head)
        lifecycle.auto_job_unanalysable(
            session,
            job_id,
            worker_id="w",
            reason="no spine in the field of view",
            series_instance_uid=None,
            localiser="localiser 1",
            now=NOW,
        )
    item = _items(service)[head]
    assert item["state"] == "not_analysed" and item["priority"] is None
    assert item["activity"] == "could not analyse: no spine in the field of view"
    counts = service.client.get("/worklist").json()["counts"]
    assert counts["not_analysed"] == 1 and counts["flagged"] == 0


def test_reader_and_automatic_results_are_both_shown_and_either_flag_flags(
    service: WorklistService,
) -> None:
    with transaction(service.sessions) as session:
        seed = Seeder(session)
        reader_high = seed.study(name="READER^HIGH", minute=0)
        seed.done(reader_high, (0.9,))
        _analysed(session, reader_high, {"L4": 0.2})
        auto_high = seed.study(name="AUTO^HIGH", minute=1)
        seed.done(auto_high, (0.1,))
        _analysed(session, auto_high, {"T12": 0.7})
        waiting = seed.study(name="AUTO^WAITING", minute=2)
        _job(session, waiting)
    items = _items(service)
    assert items[reader_high]["state"] == "flagged" and items[reader_high]["source"] == "reader"
    assert items[reader_high]["automatic"]["state"] == "routine"
    assert items[auto_high]["state"] == "flagged" and items[auto_high]["source"] == "automatic"
    assert items[auto_high]["reader"]["state"] == "routine"
    assert items[auto_high]["reader"]["probability"] == 0.1
    assert items[waiting]["state"] == "waiting"
    assert items[waiting]["activity"] == "automatic analysis in progress"
