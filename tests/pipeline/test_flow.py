"""The whole triage flow with real workers, on both stacks: SQLite + local broker (embedded)
and PostgreSQL + Redis (production)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.archive.schema import AnnotationState, RoiAnnotation, TriageResult
from tests.system import System, case_files

SystemFactory = Callable[..., System]


@pytest.fixture(params=["embedded", "production"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url_factory: Callable[[], str]
) -> Iterator[dict[str, str]]:
    if request.param == "embedded":
        yield {"database_url": f"sqlite:///{tmp_path / 'triage.db'}", "broker_url": ""}
        return
    redis = request.getfixturevalue("throwaway_redis")
    yield {"database_url": postgres_url_factory(), "broker_url": redis.url}


def _results(system: System) -> list[TriageResult]:
    with system.node.sessions() as session:
        return list(session.scalars(select(TriageResult).order_by(TriageResult.id)))


def _assert_valid_sr(system: System, result: TriageResult, case: Any) -> None:
    path = system.settings.resolved_storage_dir / result.sr_path
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == case.roi.study_instance_uid
    assert sr.SOPInstanceUID == result.sr_sop_instance_uid
    groups = sr.content.get_planar_roi_measurement_groups()
    assert groups, "no planar ROI group in the SR"
    system.wait_until(
        lambda: system.deliveries_delivered() == 1, what="the SR's delivery to the folder"
    )
    folder = next(d for d in system.settings.destinations if d.name == "results")
    copied = list(Path(folder.path).glob("*.dcm"))  # type: ignore[union-attr]
    assert any(pydicom.dcmread(p).SOPInstanceUID == result.sr_sop_instance_uid for p in copied)


def test_study_then_roi_by_rest(
    system_factory: SystemFactory, stack: dict[str, str], synthetic_cases: list[Any]
) -> None:
    system = system_factory(**stack)
    system.start_worker()
    case = synthetic_cases[0]
    system.send_study(case_files(case))
    annotation = system.post_roi(case.roi.to_json())
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the annotation to be done",
    )
    results = _results(system)
    assert len(results) == 1 and results[0].annotation_id == annotation
    assert len(results[0].slice_probabilities) == len(case.roi.slices_x_mm)
    assert results[0].patient_probability == pytest.approx(max(results[0].slice_probabilities))
    _assert_valid_sr(system, results[0], case)


def test_roi_first_then_study(
    system_factory: SystemFactory, stack: dict[str, str], synthetic_cases: list[Any]
) -> None:
    system = system_factory(**stack)
    system.start_worker()
    case = synthetic_cases[1]
    annotation = system.post_roi(case.roi.to_json())
    assert system.annotation_states()[annotation] is AnnotationState.PENDING
    system.send_study(case_files(case))
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the annotation to be done",
    )
    assert [r.annotation_id for r in _results(system)] == [annotation]


def test_roi_as_dicom_sr_by_c_store(
    system_factory: SystemFactory,
    synthetic_cases: list[Any],
    tmp_path: Path,
) -> None:
    """A TID 1500 measurement report with a SCOORD3D polygon, as a viewer saves it."""
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'sr.db'}")
    system.start_worker()
    case = synthetic_cases[2]
    files = case_files(case)
    system.send_study(files)
    sr_path = tmp_path / "roi-sr.dcm"
    _write_viewer_roi_sr(files, case.roi, sr_path)
    system.send_study([sr_path])
    system.wait_until(
        lambda: AnnotationState.DONE in system.annotation_states().values(),
        what="the SR's annotation to be done",
    )
    with system.node.sessions() as session:
        annotation = session.scalars(select(RoiAnnotation)).one()
    assert annotation.source == "sr"
    assert annotation.series_instance_uid == case.roi.series_instance_uid
    assert annotation.slices_x_mm == pytest.approx(list(case.roi.slices_x_mm), abs=1e-3)
    assert len(_results(system)) == 1


def _write_viewer_roi_sr(files: list[Path], roi: Any, path: Path) -> None:
    import numpy as np
    from pydicom.sr.codedict import codes

    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    frame_of_reference = images[0].FrameOfReferenceUID
    groups = []
    for index, x in enumerate(roi.slices_x_mm):
        points = [(x, y, z) for y, z in roi.polygon_yz_mm]
        points.append(points[0])
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"ROI {index + 1}"
                ),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                    graphic_data=np.array(points),
                    frame_of_reference_uid=frame_of_reference,
                ),
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name="Reader^Test"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report,
        series_number=99,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test viewer",
    )
    sr.save_as(path, enforce_file_format=True)


def test_worker_killed_mid_job_completes_exactly_once(
    system_factory: SystemFactory, stack: dict[str, str], synthetic_cases: list[Any]
) -> None:
    system = system_factory(**stack, job_lease_s=4.0)
    case = synthetic_cases[0]
    system.send_study(case_files(case))
    annotation = system.post_roi(case.roi.to_json())
    system.start_worker("victim")
    # the claim is taken before the model loads and the series is decoded: kill in between
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.PROCESSING,
        what="the job to be claimed",
    )
    system.kill_workers(signal.SIGKILL)
    assert system.annotation_states()[annotation] is AnnotationState.PROCESSING
    system.start_worker("survivor")
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the job to be taken over after the lease expired",
    )
    assert system.results_per_annotation() == {annotation: 1}
    study_folder = system.settings.resolved_storage_dir / case.roi.study_instance_uid
    result = _results(system)[0]
    stored_srs = [
        path
        for path in study_folder.rglob("*.dcm")
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        == result.sr_sop_instance_uid
    ]
    assert len(stored_srs) == 1


def test_broker_restarted_without_persistence_loses_no_job(
    system_factory: SystemFactory,
    throwaway_redis: Any,
    postgres_url_factory: Callable[[], str],
    synthetic_cases: list[Any],
) -> None:
    system = system_factory(database_url=postgres_url_factory(), broker_url=throwaway_redis.url)
    annotations = []
    for case in synthetic_cases:
        system.send_study(case_files(case))
        annotations.append(system.post_roi(case.roi.to_json()))
    # messages are queued in Redis (no worker yet); the restart loses them all
    system.wait_until(lambda: _all_enqueued(system, annotations), what="the jobs to be enqueued")
    throwaway_redis.stop()
    throwaway_redis.start()
    system.start_worker()
    system.wait_until(
        lambda: all(system.annotation_states().get(a) is AnnotationState.DONE for a in annotations),
        timeout=180,
        what="every job to complete after the broker restart",
    )
    assert system.results_per_annotation() == {a: 1 for a in annotations}


def _all_enqueued(system: System, ids: list[int]) -> bool:
    with system.node.sessions() as session:
        enqueued = session.scalars(
            select(RoiAnnotation.enqueued_at).where(RoiAnnotation.id.in_(ids))
        ).all()
    return len(enqueued) == len(ids) and all(value is not None for value in enqueued)


def test_two_workers_never_process_the_same_annotation(
    system_factory: SystemFactory,
    throwaway_redis: Any,
    postgres_url_factory: Callable[[], str],
    synthetic_cases: list[Any],
) -> None:
    system = system_factory(database_url=postgres_url_factory(), broker_url=throwaway_redis.url)
    annotations = []
    for case in synthetic_cases:
        system.send_study(case_files(case))
        annotations.append(system.post_roi(case.roi.to_json()))
    system.start_worker("a")
    system.start_worker("b")
    system.wait_until(
        lambda: all(system.annotation_states().get(a) is AnnotationState.DONE for a in annotations),
        timeout=180,
        what="every job to complete",
    )
    assert system.results_per_annotation() == {a: 1 for a in annotations}
    with system.node.sessions() as session:
        attempts = session.scalars(select(RoiAnnotation.attempts)).all()
    assert all(value == 1 for value in attempts), attempts
