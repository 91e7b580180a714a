"""A job's deliveries carry its review series and its key image to a real PACS (Orthanc, by
C-STORE) before the SR that draws on them and names them, sending them again stores nothing
new, and a site can turn either off."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import highdicom as hd
import pydicom
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from dicom_node.archive.schema import AnnotationState, Delivery, TriageResult
from dicom_node.dicom.storage import FileStore
from dicom_node.settings import CStoreDestination
from tests.delivery.conftest import orthanc_instances
from tests.services import Orthanc
from tests.system import System, case_files
from worker.delivery import load_payload
from worker.derived import REVIEW_IMAGE_TYPE
from worker.destinations.cstore import CStoreSender


def _pacs_destination(pacs: Orthanc) -> dict[str, Any]:
    return {
        "name": "pacs",
        "kind": "cstore",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "timeout_s": 10,
    }


def test_deliveries_carry_the_review_series_to_the_pacs(
    system_factory: Callable[..., System],
    synthetic_cases: list[Any],
    pacs: Orthanc,
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'review.db'}",
        destinations=(
            f'[{{"name": "results", "kind": "folder", "path": "{results}"}}, '
            + json.dumps(_pacs_destination(pacs))
            + "]"
        ),
    )
    system.start_worker()
    case = synthetic_cases[0]
    system.send_study(case_files(case))
    annotation = system.post_roi(case.roi.to_json())
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the annotation to be done",
    )
    system.wait_until(lambda: system.deliveries_delivered() == 2, what="both deliveries")
    with system.node.sessions() as session:
        result = session.scalars(select(TriageResult)).one()
        pacs_delivery = session.scalars(
            select(Delivery).where(Delivery.destination == "pacs")
        ).one()
    assert result.review_series_instance_uid and result.review_paths
    assert len(result.review_paths) == len(case.roi.slices_x_mm)

    held = orthanc_instances(pacs, case.roi.study_instance_uid)
    by_series: dict[str, list[pydicom.Dataset]] = {}
    with pacs.client() as client:
        for instance in held:
            if instance["MainDicomTags"]["SOPInstanceUID"] not in {
                result.sr_sop_instance_uid,
                *_review_uids(system, result),
            }:
                continue
            raw = client.get(f"/instances/{instance['ID']}/file").content
            ds = pydicom.dcmread(io.BytesIO(raw))
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    review = by_series[result.review_series_instance_uid]
    assert len(review) == len(case.roi.slices_x_mm)
    ct = pydicom.dcmread(case_files(case)[0], stop_before_pixels=True)
    for image in review:
        assert list(image.ImageType) == REVIEW_IMAGE_TYPE
        assert image.StudyInstanceUID == ct.StudyInstanceUID
        assert image.FrameOfReferenceUID == ct.FrameOfReferenceUID
        assert [float(v) for v in image.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    sr = hd.sr.Comprehensive3DSR.from_dataset(by_series[result.sr_series_instance_uid][0])
    groups = sr.content.get_planar_roi_measurement_groups()
    drawn = [g for g in groups if isinstance(g.roi, hd.sr.ImageRegion)]
    assert len(drawn) == 1 + len(case.roi.slices_x_mm)
    review_uids = {str(image.SOPInstanceUID) for image in review}
    for group in drawn:
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in (
            review_uids
        )

    # The same delivery sent again (a retry after a lost response): nothing new in the PACS.
    count = len(orthanc_instances(pacs, case.roi.study_instance_uid))
    store = FileStore(system.settings.resolved_storage_dir)
    with system.node.sessions() as session:
        payload = load_payload(session, SimpleNamespace(store=store), pacs_delivery.id, 2)  # type: ignore[arg-type]
    assert len(payload.review_paths) == len(case.roi.slices_x_mm)
    config = CStoreDestination(**_pacs_destination(pacs))
    CStoreSender(config, node_ae_title="SPINE_TRIAGE").send(payload)
    assert len(orthanc_instances(pacs, case.roi.study_instance_uid)) == count
    copied = {pydicom.dcmread(p).SOPInstanceUID for p in results.glob("*.dcm")}
    key_uid = _key_image_uid(system, result)
    assert copied == {result.sr_sop_instance_uid, *review_uids, key_uid}

    # The key image: Secondary Capture in the study, stored before the SR, in its evidence.
    key = by_series_of(pacs, case.roi.study_instance_uid, key_uid)
    assert key.SOPClassUID == SecondaryCaptureImageStorage and key.BurnedInAnnotation == "YES"
    order = _arrival_order(pacs)
    assert order[key_uid] < order[result.sr_sop_instance_uid]
    assert all(order[uid] < order[result.sr_sop_instance_uid] for uid in review_uids)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert key_uid in evidence


def test_a_site_can_turn_the_review_series_off(
    system_factory: Callable[..., System], synthetic_cases: list[Any], tmp_path: Path
) -> None:
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'off.db'}", review_series="false")
    system.start_worker()
    case = synthetic_cases[1]
    system.send_study(case_files(case))
    annotation = system.post_roi(case.roi.to_json())
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the annotation to be done",
    )
    system.wait_until(lambda: system.deliveries_delivered() == 1, what="the delivery")
    with system.node.sessions() as session:
        result = session.scalars(select(TriageResult)).one()
    assert result.review_series_instance_uid is None and result.review_paths is None
    folder = system.settings.var_dir / "results"
    # the SR and its key image (drawn on a review image made for it alone, not sent)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in folder.glob("*.dcm")} == {
        result.sr_sop_instance_uid,
        _key_image_uid(system, result),
    }
    key = pydicom.dcmread(system.settings.resolved_storage_dir / str(result.key_image_path))
    assert "SourceImageSequence" not in key  # it names no image the PACS does not get


def test_a_site_can_turn_the_key_image_off(
    system_factory: Callable[..., System], synthetic_cases: list[Any], tmp_path: Path
) -> None:
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'nokey.db'}", key_image="false")
    system.start_worker()
    case = synthetic_cases[2]
    system.send_study(case_files(case))
    annotation = system.post_roi(case.roi.to_json())
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the annotation to be done",
    )
    system.wait_until(lambda: system.deliveries_delivered() == 1, what="the delivery")
    with system.node.sessions() as session:
        result = session.scalars(select(TriageResult)).one()
    assert result.key_image_path is None and result.review_paths
    folder = system.settings.var_dir / "results"
    sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    assert SecondaryCaptureImageStorage not in {ds.SOPClassUID for ds in sent}
    assert len(sent) == 1 + len(result.review_paths)


def _review_uids(system: System, result: TriageResult) -> set[str]:
    root = system.settings.resolved_storage_dir
    return {
        str(pydicom.dcmread(root / path, stop_before_pixels=True).SOPInstanceUID)
        for path in result.review_paths or []
    }


def _key_image_uid(system: System, result: TriageResult) -> str:
    assert result.key_image_path is not None
    path = system.settings.resolved_storage_dir / result.key_image_path
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def by_series_of(pacs: Orthanc, study_instance_uid: str, sop_instance_uid: str) -> pydicom.Dataset:
    """The instance ``sop_instance_uid`` as the PACS holds it."""
    for instance in orthanc_instances(pacs, study_instance_uid):
        if instance["MainDicomTags"]["SOPInstanceUID"] == sop_instance_uid:
            with pacs.client() as client:
                raw = client.get(f"/instances/{instance['ID']}/file").content
            return pydicom.dcmread(io.BytesIO(raw))
    raise AssertionError(f"the PACS holds no instance {sop_instance_uid}")


def _arrival_order(pacs: Orthanc) -> dict[str, int]:
    """SOP Instance UID → the sequence number of its arrival in the PACS (Orthanc's changes)."""
    order: dict[str, int] = {}
    with pacs.client() as client:
        since = 0
        while True:
            answer = client.get("/changes", params={"since": since, "limit": 1000}).json()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    tags = client.get(f"/instances/{change['ID']}").json()["MainDicomTags"]
                    order.setdefault(tags["SOPInstanceUID"], change["Seq"])
            since = answer["Last"]
            if answer["Done"]:
                return order
