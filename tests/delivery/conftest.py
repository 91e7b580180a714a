"""Shared pieces of the delivery tests: a real result SR, payloads, a shared Orthanc."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.findings import make_finding
from tests.services import Orthanc
from tests.sr.synthetic_ct import axial_series, new_study
from worker.destinations import DeliveryPayload
from worker.sr import AlgorithmInfo, build_triage_sr, sr_to_bytes

POLYGON = ((10.0, -80.0), (30.5, -80.0), (32.0, -62.25), (9.5, -60.0))
SLICES_X_MM = (-3.0, 0.0, 3.0)
DEVICE_UID = "1.2.826.0.1.3680043.8.498.4711"
MODEL_NAME = "resnet50-li2021"
MODEL_VERSION = "1.2.0"


@dataclass(frozen=True)
class ResultStudy:
    """A synthetic CT study and the result SR written for it."""

    ct: list[pydicom.Dataset]
    sr: pydicom.Dataset
    sr_path: Path
    probability: float

    @property
    def study_instance_uid(self) -> str:
        return str(self.sr.StudyInstanceUID)

    @property
    def sr_sop_instance_uid(self) -> str:
        return str(self.sr.SOPInstanceUID)

    def ct_part10(self) -> list[bytes]:
        return [sr_to_bytes(image) for image in self.ct]

    def payload(self, **changes: Any) -> DeliveryPayload:
        malignant = self.probability >= 0.5
        values: dict[str, Any] = {
            "delivery_id": 7,
            "result_id": 3,
            "attempt": 1,
            "study_instance_uid": self.study_instance_uid,
            "accession_number": str(self.ct[0].AccessionNumber),
            "patient_id": str(self.ct[0].PatientID),
            "patient_name": str(self.ct[0].PatientName),
            "sr_path": self.sr_path,
            "sr_sop_instance_uid": self.sr_sop_instance_uid,
            "sr_series_instance_uid": str(self.sr.SeriesInstanceUID),
            "patient_probability": self.probability,
            "slice_x_mm": SLICES_X_MM,
            "slice_probabilities": slice_probabilities(self.probability),
            "label": "malignant" if malignant else "benign",
            "priority": "HIGH" if malignant else "ROUTINE",
            "threshold": 0.5,
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "demonstration": False,
            "vertebra": "L1",
            "result_created_at": datetime(2024, 3, 1, 10, 15, 30, tzinfo=UTC),
        }
        values.update(changes)
        return DeliveryPayload(**values)


def slice_probabilities(patient_probability: float) -> tuple[float, float, float]:
    """Per-slice probabilities whose maximum (the central slice) is the patient's."""
    return (patient_probability / 2, patient_probability, patient_probability / 4)


def make_result_study(folder: Path, probability: float = 0.91) -> ResultStudy:
    """A fresh CT study (own UIDs) and its result SR written under ``folder``."""
    study_uid, frame_uid = new_study()
    ct = axial_series(study_uid, frame_uid, slices=3)
    malignant = probability >= 0.5
    finding = make_finding(
        polygon_yz_mm=POLYGON,
        slices_x_mm=SLICES_X_MM,
        slice_probabilities=slice_probabilities(probability),
        patient_probability=probability,
        label="malignant" if malignant else "benign",
        priority="HIGH" if malignant else "ROUTINE",
        threshold=0.5,
        vertebra="L1",
    )
    algorithm = AlgorithmInfo(name=MODEL_NAME, version=MODEL_VERSION, device_uid=DEVICE_UID)
    sr = build_triage_sr(ct, finding, algorithm, annotation_key=f"annotation-{study_uid}")
    folder.mkdir(parents=True, exist_ok=True)
    sr_path = folder / "result-sr.dcm"
    sr_path.write_bytes(sr_to_bytes(sr))
    return ResultStudy(ct=ct, sr=pydicom.dcmread(sr_path), sr_path=sr_path, probability=probability)


@pytest.fixture
def result_study_factory(tmp_path: Path) -> Callable[..., ResultStudy]:
    counter = iter(range(1_000_000))

    def make(probability: float = 0.91) -> ResultStudy:
        return make_result_study(tmp_path / f"result-{next(counter)}", probability)

    return make


@pytest.fixture
def result_study(result_study_factory: Callable[..., ResultStudy]) -> ResultStudy:
    return result_study_factory()


@pytest.fixture(scope="module")
def pacs() -> Iterator[Orthanc]:
    """One real Orthanc (DICOMweb plugin, triage metadata declared) for a test module.

    Tests share it but each uses a study of its own; a test that stops Orthanc uses the
    ``orthanc_factory`` fixture instead.
    """
    folder = Path(tempfile.mkdtemp(prefix="st-delivery-orthanc-"))
    server = Orthanc(folder).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def orthanc_instances(server: Orthanc, study_instance_uid: str) -> list[dict[str, Any]]:
    """The instances Orthanc holds in a study (its REST API, not DICOMweb)."""
    with server.client() as client:
        found = client.post("/tools/lookup", content=study_instance_uid).json()
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return []
        answer = client.get(f"/studies/{studies[0]}/instances", params={"expand": "true"})
        answer.raise_for_status()
        instances: list[dict[str, Any]] = answer.json()
        return instances


def upload_to_orthanc(server: Orthanc, part10_files: list[bytes]) -> None:
    with server.client() as client:
        for content in part10_files:
            answer = client.post("/instances", content=content)
            assert answer.status_code == 200, answer.text
