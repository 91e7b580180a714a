"""End to end against a real PACS: Orthanc forwards a stable study to the node (its Lua
``OnStableStudy`` hook), an ROI is posted, and the result comes back — the SR into the study
on Orthanc (C-STORE), the priority into Orthanc's study metadata, an ORU to a real MLLP
listener — exactly once, also when Orthanc is down while results are produced."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import func, select

from dicom_node.archive.schema import AnnotationState, Delivery, DeliveryState, TriageResult
from tests.services import MllpListener, Orthanc
from tests.support import require_binary
from tests.system import System, case_files

FORWARD_STABLE_STUDIES = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/node/store',
              '{"Resources":["' .. studyId .. '"],"Asynchronous":true}', true)
end
"""


@pytest.fixture
def ris() -> Iterator[MllpListener]:
    listener = MllpListener().start()
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> dict[str, Any]:
    """A held-out malignant and a held-out benign synthetic study the model calls right from
    the reader's ROI."""
    from tests.answers import case_called_right

    folder = tmp_path_factory.mktemp("e2e-cases")
    return {
        label: case_called_right(
            folder, demo_checkpoint, patient_id=f"E2E-{label}", label=label, mode="reader"
        )
        for label in ("malignant", "benign")
    }


def _destinations(orthanc: Orthanc, ris: MllpListener) -> str:
    return json.dumps(
        [
            {
                "name": "pacs",
                "kind": "cstore",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            },
            {
                "name": "pacs-worklist",
                "kind": "orthanc",
                "url": orthanc.url,
                "username": orthanc.user,
                "password": orthanc.password,
            },
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
        ]
    )


def _upload(orthanc: Orthanc, files: list[Path]) -> None:
    with orthanc.client() as client:
        for path in files:
            assert client.post("/instances", content=path.read_bytes()).status_code == 200


def _all_delivered(system: System, expected: int) -> bool:
    with system.node.sessions() as session:
        delivered = session.scalar(
            select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.DELIVERED)
        )
    return delivered == expected


def _orthanc_srs(orthanc: Orthanc, study_uid: str) -> list[Any]:
    client = DICOMwebClient(url=orthanc.dicomweb_url, headers=None)
    client._session.auth = orthanc.auth
    return client.search_for_instances(study_uid, search_filters={"Modality": "SR"})


def _priority_of(message: Any) -> str:
    return str(message.segment("OBR").extract_field(1, 5, 1, 1))


def test_orthanc_forwards_node_flags_and_everything_comes_back(
    system_factory: Callable[..., System],
    orthanc_factory: Callable[..., Orthanc],
    ris: MllpListener,
    cases: dict[str, Any],
    demo_checkpoint: Path,
    tmp_path: Path,
) -> None:
    dciodvfy = require_binary("dciodvfy")
    orthanc = orthanc_factory(lua=FORWARD_STABLE_STUDIES, stable_age_s=1)
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'e2e.db'}",
        model_checkpoint=demo_checkpoint,
        destinations=_destinations(orthanc, ris),
        allowed_calling_aes="ORTHANC",
    )
    with orthanc.client() as client:  # the node as a modality of the PACS
        answer = client.put(
            "/modalities/node",
            json={"AET": "SPINE_TRIAGE", "Host": "127.0.0.1", "Port": system.node.dicom_address[1]},
        )
        assert answer.status_code == 200, answer.text
    system.start_worker()
    annotations = {}
    for label, case in cases.items():
        _upload(orthanc, case_files(case))  # the PACS receives the study...
        annotations[label] = system.post_roi(case.roi.to_json())  # ...a radiologist marks the ROI
    system.wait_until(
        lambda: all(
            system.annotation_states().get(a) is AnnotationState.DONE for a in annotations.values()
        ),
        timeout=240,
        what="both annotations to be done (forwarded by Orthanc's OnStableStudy)",
    )
    system.wait_until(lambda: _all_delivered(system, 6), what="every delivery")

    with system.node.sessions() as session:
        results = {r.annotation_id: r for r in session.scalars(select(TriageResult)).all()}
    for label, case in cases.items():
        result = results[annotations[label]]
        assert result.priority == ("HIGH" if label == "malignant" else "ROUTINE"), (
            f"{label} phantom scored {result.patient_probability:.3f}"
        )
        # the SR is in the original study on the PACS: found by QIDO-RS, valid when fetched back
        srs = _orthanc_srs(orthanc, case.roi.study_instance_uid)
        assert [sr["00080018"]["Value"][0] for sr in srs] == [result.sr_sop_instance_uid]
        client = DICOMwebClient(url=orthanc.dicomweb_url)
        client._session.auth = orthanc.auth
        fetched = client.retrieve_instance(
            case.roi.study_instance_uid, result.sr_series_instance_uid, result.sr_sop_instance_uid
        )
        path = tmp_path / f"{label}-sr.dcm"
        fetched.save_as(path, enforce_file_format=True)
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], check.stderr
        # the PACS's study metadata carries the priority
        with orthanc.client() as pacs:
            found = pacs.post("/tools/lookup", content=case.roi.study_instance_uid).json()
            study_id = next(item["ID"] for item in found if item["Type"] == "Study")
            priority = pacs.get(f"/studies/{study_id}/metadata/TriagePriority").text
        assert priority == result.priority
    # the RIS got one ORU per study: STAT for the malignant one only
    by_accession = {}
    for message in ris.received:
        study_uid = str(message.segment("ZDS").extract_field(1, 1, 1, 1))
        by_accession[study_uid] = _priority_of(message)
    assert by_accession[cases["malignant"].roi.study_instance_uid] == "S"
    assert by_accession[cases["benign"].roi.study_instance_uid] != "S"


def test_pacs_down_while_results_are_produced_gets_every_sr_once(
    system_factory: Callable[..., System],
    orthanc_factory: Callable[..., Orthanc],
    ris: MllpListener,
    cases: dict[str, Any],
    checkpoint_path: Path,
    tmp_path: Path,
) -> None:
    orthanc = orthanc_factory()
    for case in cases.values():
        _upload(orthanc, case_files(case))
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'down.db'}",
        model_checkpoint=checkpoint_path,
        destinations=_destinations(orthanc, ris),
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
    )
    orthanc.stop()  # the PACS goes down before any result exists
    system.start_worker()
    annotations = []
    for case in cases.values():
        system.send_study(case_files(case))
        annotations.append(system.post_roi(case.roi.to_json()))
    system.wait_until(
        lambda: all(system.annotation_states().get(a) is AnnotationState.DONE for a in annotations),
        what="results while the PACS is down",
    )
    system.wait_until(lambda: _failed_attempts(system) >= 2, what="deliveries failing")
    assert not _all_delivered(system, 6)
    orthanc.start()  # back, on the same ports and storage
    system.wait_until(lambda: _all_delivered(system, 6), timeout=120, what="every delivery")
    for case in cases.values():
        srs = _orthanc_srs(orthanc, case.roi.study_instance_uid)
        assert len(srs) == 1, f"{len(srs)} SRs in study {case.roi.study_instance_uid}"


def _failed_attempts(system: System) -> int:
    with system.node.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(
                    Delivery.attempts >= 1, Delivery.state != DeliveryState.DELIVERED
                )
            )
            or 0
        )
