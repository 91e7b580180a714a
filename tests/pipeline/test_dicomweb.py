"""DICOMweb both ways: STOW-RS into the node, and WADO-RS retrieval of a study the node never
received, from a real Orthanc with its DICOMweb plugin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import func, select

from dicom_node.archive.schema import AnnotationState, Instance
from tests.dicom_factory import write_ct_series
from tests.system import System, case_files


def test_stow_rs_into_the_node_is_durable_and_answers_the_standard_response(
    system_factory: Callable[..., System], tmp_path: Path
) -> None:
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'stow.db'}")
    files = write_ct_series(tmp_path / "ct", 4)
    client = DICOMwebClient(
        url=f"{system.api}/dicomweb", headers={"Authorization": "Bearer test-token"}
    )
    import pydicom

    datasets = [pydicom.dcmread(p) for p in files]
    answer = client.store_instances(datasets)
    referenced = answer.ReferencedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced) == sorted(
        ds.SOPInstanceUID for ds in datasets
    )
    assert "FailedSOPSequence" not in answer
    with system.node.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 4
        assert set(session.scalars(select(Instance.calling_ae))) == {"STOW-RS"}

    # a write without the token is refused
    unauthenticated = httpx.post(
        f"{system.api}/dicomweb/studies",
        content=b"--x\r\n\r\n--x--",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
    )
    assert unauthenticated.status_code == 401


def test_stow_rs_reports_refused_instances(
    system_factory: Callable[..., System], tmp_path: Path
) -> None:
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'stow2.db'}")
    good = write_ct_series(tmp_path / "ok", 1)[0].read_bytes()
    boundary = "spine-triage-boundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in (good, b"not a DICOM object at all")
        )
        + f"--{boundary}--\r\n".encode()
    )
    answer = httpx.post(
        f"{system.api}/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": "Bearer test-token",
        },
    )
    assert answer.status_code == 202  # some stored, some failed
    payload = answer.json()
    assert len(payload["00081199"]["Value"]) == 1
    failed = payload["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC210]


def test_worker_retrieves_a_study_the_node_never_received(
    system_factory: Callable[..., System],
    orthanc_factory: Callable[..., Any],
    synthetic_cases: list[Any],
    tmp_path: Path,
) -> None:
    orthanc = orthanc_factory()
    case = synthetic_cases[1]
    with orthanc.client() as client:
        for path in case_files(case):
            assert client.post("/instances", content=path.read_bytes()).status_code == 200
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'pull.db'}",
        dicomweb_source_url=orthanc.dicomweb_url,
        dicomweb_source_username=orthanc.user,
        dicomweb_source_password=orthanc.password,
    )
    system.start_worker()
    annotation = system.post_roi(case.roi.to_json())  # no C-STORE, no STOW: pull only
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the pulled study's annotation to be done",
    )
    with system.node.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == len(case_files(case))
    assert system.results_per_annotation() == {annotation: 1}


@pytest.mark.parametrize("status", [401])
def test_rest_api_refuses_unauthenticated_writes(
    system_factory: Callable[..., System], tmp_path: Path, status: int
) -> None:
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'auth.db'}")
    roi = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.4",
        "slices_x_mm": [0.0],
        "polygon_yz_mm": [[0, 0], [10, 0], [10, 10]],
    }
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        answer = httpx.post(f"{system.api}/annotations", json=roi, headers=headers)
        assert answer.status_code == status
