"""An automatic job sends its flag before it builds its report: the result and the flag sinks'
deliveries are committed first, the review series, key image and SR after. A worker that dies
between the two leaves the job processing under its lease; the next claim finishes the report
with the same UIDs, and nothing is sent twice. Through the worker's own functions with real
components: the demonstration model, a real database and store, the SR read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select, update

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AutoJob, AutoJobState, Delivery, TriageResult
from dicom_node.dicom.ingest import StoreContext, store_instance
from dicom_node.settings import Settings
from dicom_node.web.worklist_query import build_study_detail
from tests.answers import case_called_right
from tests.support import free_port
from tests.system import case_files
from worker import automatic
from worker.automatic import run_automatic
from worker.pipeline import Outcome
from worker.runtime import WorkerRuntime


class _WorkerDied(BaseException):
    """Stands for the process being killed: nothing of the job's error handling runs."""


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Any:
    """A held-out malignant phantom the model flags automatically."""
    return case_called_right(
        tmp_path_factory.mktemp("flag-first"),
        demo_checkpoint,
        patient_id="FLAG-FIRST",
        label="malignant",
        mode="automatic",
    )


def _runtime(tmp_path: Path, url: str, checkpoint: Path) -> WorkerRuntime:
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        model_checkpoint=checkpoint,
        destinations=[
            {"name": "pacs", "kind": "folder", "path": str(tmp_path / "pacs")},
            # a flag sink (nothing listens: its delivery is only recorded here)
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": free_port()},
        ],
    )
    return WorkerRuntime.from_settings(settings)


def _receive_and_make_job(rt: WorkerRuntime, case: Any) -> int:
    context = StoreContext(store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine))
    for path in case_files(case):
        assert store_instance(context, path.read_bytes(), transfer_syntax=None, source="test").ok
    now = datetime.now(UTC) + timedelta(seconds=1)
    with transaction(rt.sessions) as session:
        lifecycle.complete_quiet_studies(session, quiet_period_s=0, now=now)
        (job_id,) = lifecycle.create_auto_jobs(session, policy="always", fallback_s=0, now=now)
    return job_id


def _state(rt: WorkerRuntime, job_id: int) -> tuple[AutoJob, list[TriageResult], list[Delivery]]:
    with rt.sessions() as session:
        job = session.get(AutoJob, job_id)
        assert job is not None
        results = list(session.scalars(select(TriageResult)))
        deliveries = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        return job, results, deliveries


def _derived_uids(rt: WorkerRuntime, case: Any) -> set[str]:
    """SOP Instance UIDs of everything the jobs stored in the study besides the CT."""
    folder = rt.store.root / case.roi.study_instance_uid
    return {
        str(ds.SOPInstanceUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.rglob("*.dcm"))
        if ds.SeriesInstanceUID != case.roi.series_instance_uid
    }


@pytest.mark.parametrize("dies_in", ["write_report", "record_report"])
def test_a_worker_dying_after_the_flag_leaves_the_report_to_the_next_claim(
    tmp_path: Path,
    database_url: str,
    demo_checkpoint: Path,
    case: Any,
    monkeypatch: pytest.MonkeyPatch,
    dies_in: str,
) -> None:
    """The worker dies building the report, or with the report written but not recorded."""
    rt = _runtime(tmp_path, database_url, demo_checkpoint)
    job_id = _receive_and_make_job(rt, case)

    def die(*args: Any, **kwargs: Any) -> Any:
        raise _WorkerDied

    with monkeypatch.context() as patch:
        patch.setattr(automatic, dies_in, die)
        with pytest.raises(_WorkerDied):
            run_automatic(rt, job_id)
    first_files = _derived_uids(rt, case)
    assert bool(first_files) is (dies_in == "record_report")

    # The flag is out: the result and the flag sink's delivery committed, the report not yet.
    job, results, deliveries = _state(rt, job_id)
    assert job.state is AutoJobState.PROCESSING
    (result,) = results
    assert result.priority == "HIGH", result.bodies
    assert result.sr_path is None and result.review_paths is None
    assert [d.destination for d in deliveries] == ["ris"]
    flag_delivery = deliveries[0].id
    with rt.sessions() as session:
        item = build_study_detail(session, case.roi.study_instance_uid)
    assert item is not None and item["state"] == "flagged"  # the worklist shows it already

    # Its lease expires; the sweeper's message wakes a worker, whose claim finishes the report.
    with transaction(rt.sessions) as session:
        session.execute(
            update(AutoJob)
            .where(AutoJob.id == job_id)
            .values(claimed_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    outcome = run_automatic(rt, job_id)

    assert outcome.outcome is Outcome.DONE and outcome.result_id == result.id, outcome.reason
    job, results, deliveries = _state(rt, job_id)
    assert job.state is AutoJobState.DONE and job.attempts == 2
    (finished,) = results
    assert finished.sr_sop_instance_uid == result.sr_sop_instance_uid  # the UIDs sent with the flag
    assert finished.sr_path is not None and finished.review_paths
    assert "report_s" in finished.timings and "inference_s" in finished.timings
    sr = pydicom.dcmread(rt.store.absolute(finished.sr_path))
    assert sr.SOPInstanceUID == result.sr_sop_instance_uid
    assert sr.SeriesInstanceUID == result.sr_series_instance_uid
    _check_shared_review_images(rt, finished, sr)
    # the key image: stored, listed in the SR's evidence
    assert finished.key_image_path is not None
    key = pydicom.dcmread(rt.store.absolute(finished.key_image_path), stop_before_pixels=True)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert key.SOPInstanceUID in evidence and key.BurnedInAnnotation == "YES"
    # the report written again names the same objects (review images, key image, SR)
    if first_files:
        assert _derived_uids(rt, case) == first_files
    # one delivery per destination, the flag's not made twice
    assert sorted((d.destination, d.id == flag_delivery) for d in deliveries) == [
        ("pacs", False),
        ("ris", True),
    ]
    assert run_automatic(rt, job_id).outcome is Outcome.SKIPPED  # done: nothing to claim
    rt.close()


def _check_shared_review_images(rt: WorkerRuntime, result: TriageResult, sr: Any) -> None:
    """One review image per distinct central slice position of the bodies (the bodies at one
    position share it), and each body's box drawn on the image at its central slice."""
    assert result.bodies and result.review_paths
    images = [
        pydicom.dcmread(rt.store.absolute(path), stop_before_pixels=True)
        for path in result.review_paths
    ]
    centres = [_central(body["slice_x_mm"]) for body in result.bodies]  # type: ignore[arg-type]
    assert [round(float(image.SliceLocation), 2) for image in images] == sorted(set(centres))
    assert len(images) < len(result.bodies)  # the phantom's bodies share positions
    image_at = {round(float(image.SliceLocation), 2): str(image.SOPInstanceUID) for image in images}
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    drawn = [g for g in groups if isinstance(g.roi, hd.sr.ImageRegion)]
    assert len(drawn) == len(result.bodies)
    for group, centre in zip(drawn, centres, strict=True):  # both most suspicious first
        reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == image_at[centre]


def _central(xs: list[float]) -> float:
    ordered = sorted(xs)
    return round(ordered[(len(ordered) - 1) // 2], 2)
