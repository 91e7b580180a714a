"""The test PACS of compose.yaml, for real: Orthanc runs the Lua script from deploy/ with the
compose file's modality and forwards a stable study to a running node, but not the result
SR that spine-triage itself wrote into the study (which would echo it back)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import Instance, Series
from dicom_node.node import Node, start_node
from dicom_node.settings import Settings
from tests.deploy.files import DEPLOY, load_compose
from tests.findings import make_finding
from tests.sr.synthetic_ct import axial_series, new_study
from tests.support import free_port
from worker.sr import AlgorithmInfo, build_triage_sr, sr_to_bytes

LUA = DEPLOY / "orthanc" / "forward-to-spine-triage.lua"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.4711"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    orthanc_env = load_compose()["services"]["orthanc"]["environment"]
    database_url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(database_url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=database_url,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        allowed_calling_aes=[orthanc_env["ORTHANC__DICOM_AET"]],
        min_free_disk_mb=0,
    )
    running = start_node(settings, send=None, run_scheduler=False)
    try:
        yield running
    finally:
        running.stop()


def _part10(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _result_sr(images: list[pydicom.Dataset], manufacturer: str, key: str) -> bytes:
    finding = make_finding(
        polygon_yz_mm=((-5.0, -95.0), (5.0, -95.0), (5.0, -85.0), (-5.0, -85.0)),
        slices_x_mm=(-3.0, 0.0, 3.0),
        slice_probabilities=(0.4, 0.9, 0.7),
        patient_probability=0.9,
        label="malignant",
        priority="HIGH",
        threshold=0.5,
    )
    algorithm = AlgorithmInfo(
        name="resnet50", version="1", device_uid=DEVICE_UID, manufacturer=manufacturer
    )
    return sr_to_bytes(build_triage_sr(images, finding, algorithm, annotation_key=key))


def _series_in_node(node: Node) -> dict[str, int]:
    with node.sessions() as session:
        rows = session.execute(
            select(Series.series_instance_uid, Instance.sop_instance_uid).join(
                Instance, Instance.series_id == Series.id
            )
        ).all()
    counts: dict[str, int] = {}
    for series_uid, _ in rows:
        counts[series_uid] = counts.get(series_uid, 0) + 1
    return counts


def _wait_for_jobs(client: httpx.Client, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = client.get("/jobs", params={"expand": ""}).json()
        store_jobs = [job for job in jobs if job["Type"] == "DicomModalityStore"]
        if store_jobs and all(job["State"] in ("Success", "Failure") for job in store_jobs):
            return store_jobs
        time.sleep(0.2)
    raise AssertionError(f"Orthanc did not finish forwarding within {timeout_s} s")


def test_lua_knows_the_manufacturer_our_results_carry() -> None:
    default = AlgorithmInfo(name="m", version="1", device_uid=DEVICE_UID).manufacturer
    assert f"TRIAGE_MANUFACTURER = '{default}'" in LUA.read_text()


def test_orthanc_forwards_stable_studies_but_not_our_results(
    node: Node, orthanc_factory: Callable[..., Any]
) -> None:
    environment = load_compose()["services"]["orthanc"]["environment"]
    modalities = json.loads(environment["ORTHANC__DICOM_MODALITIES"])
    ae_title, _host, _port = modalities["spine-triage"]
    assert ae_title == node.settings.ae_title
    modalities["spine-triage"] = [ae_title, "127.0.0.1", node.dicom_address[1]]
    orthanc = orthanc_factory(
        aet=environment["ORTHANC__DICOM_AET"],
        modalities=modalities,
        lua=LUA.read_text(),
        stable_age_s=1,  # compose.yaml: 30 s
    )

    study_uid, frame_uid = new_study()
    ct = axial_series(study_uid, frame_uid, slices=4)
    ours = _result_sr(ct, "spine-triage project", "ours")
    viewer = _result_sr(ct, "Another Vendor", "viewer")
    with orthanc.client() as client:
        for data in [*(_part10(image) for image in ct), ours, viewer]:
            assert client.post("/instances", content=data).status_code == 200
        jobs = _wait_for_jobs(client, timeout_s=30)
    assert [job["State"] for job in jobs] == ["Success"], jobs

    received = _series_in_node(node)
    ct_series_uid = str(ct[0].SeriesInstanceUID)
    our_series = str(pydicom.dcmread(BytesIO(ours)).SeriesInstanceUID)
    viewer_series = str(pydicom.dcmread(BytesIO(viewer)).SeriesInstanceUID)
    assert received.get(ct_series_uid) == 4, received
    assert received.get(viewer_series) == 1, "SRs of other vendors (ROIs) are forwarded"
    assert our_series not in received, "the node's own result must not come back"
