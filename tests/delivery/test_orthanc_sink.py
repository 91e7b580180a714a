"""Orthanc study metadata (priority, status, probability) set through its REST API."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.settings import OrthancDestination
from tests.delivery.conftest import ResultStudy, upload_to_orthanc
from tests.services import Orthanc
from tests.support import free_port
from worker.destinations import DeliveryPayload
from worker.destinations.orthanc import OrthancMetadataSetter
from worker.errors import PermanentError, TransientError


def setter_for(url: str, **options: Any) -> OrthancMetadataSetter:
    return OrthancMetadataSetter(
        OrthancDestination(name="orthanc", url=url, timeout_s=5, **options)
    )


def study_metadata(server: Orthanc, study_instance_uid: str) -> dict[str, str]:
    with server.client() as client:
        found = client.post("/tools/lookup", content=study_instance_uid).json()
        study_id = next(item["ID"] for item in found if item["Type"] == "Study")
        answer = client.get(f"/studies/{study_id}/metadata", params={"expand": "true"})
        answer.raise_for_status()
        metadata: dict[str, str] = answer.json()
        return metadata


def test_flagged_study_metadata_is_readable_after_send(
    pacs: Orthanc, result_study: ResultStudy
) -> None:
    upload_to_orthanc(pacs, result_study.ct_part10())
    setter = setter_for(pacs.url, username=pacs.user, password=pacs.password)
    setter.send(result_study.payload())

    metadata = study_metadata(pacs, result_study.study_instance_uid)
    assert metadata["TriagePriority"] == "HIGH"
    assert metadata["TriageStatus"] == "malignant"
    assert metadata["TriageProbability"] == "0.9100"


def test_a_later_result_replaces_the_flag(pacs: Orthanc, result_study_factory: Any) -> None:
    routine = result_study_factory(probability=0.2)
    upload_to_orthanc(pacs, routine.ct_part10())
    setter = setter_for(pacs.url, username=pacs.user, password=pacs.password)
    setter.send(routine.payload(priority="HIGH", label="malignant", patient_probability=0.7))
    setter.send(routine.payload(demonstration=True))
    setter.send(routine.payload(demonstration=True))  # idempotent

    metadata = study_metadata(pacs, routine.study_instance_uid)
    assert metadata["TriagePriority"] == "ROUTINE"
    assert metadata["TriageStatus"] == "benign (DEMONSTRATION MODEL - NOT FOR CLINICAL USE)"
    assert metadata["TriageProbability"] == "0.2000"


def test_study_not_in_orthanc_yet_is_transient(pacs: Orthanc, result_study: ResultStudy) -> None:
    setter = setter_for(pacs.url, username=pacs.user, password=pacs.password)
    with pytest.raises(TransientError, match="does not hold study"):
        setter.send(result_study.payload())


def test_wrong_credentials_are_permanent(pacs: Orthanc, result_study: ResultStudy) -> None:
    setter = setter_for(pacs.url, username=pacs.user, password="wrong")
    with pytest.raises(PermanentError, match="401"):
        setter.send(result_study.payload())


def test_orthanc_down_is_transient(result_study: ResultStudy) -> None:
    with pytest.raises(TransientError, match="not reachable"):
        setter_for(f"http://127.0.0.1:{free_port()}").send(result_study.payload())


class _SetterWithAnUndeclaredName(OrthancMetadataSetter):
    def metadata_for(self, payload: DeliveryPayload) -> dict[str, str]:
        return {**super().metadata_for(payload), "TriageUndeclared": "x"}


def test_undeclared_metadata_is_permanent_with_a_hint(
    pacs: Orthanc, result_study: ResultStudy
) -> None:
    upload_to_orthanc(pacs, result_study.ct_part10())
    setter = _SetterWithAnUndeclaredName(
        OrthancDestination(name="orthanc", url=pacs.url, username=pacs.user, password=pacs.password)
    )
    with pytest.raises(PermanentError, match="UserMetadata"):
        setter.send(result_study.payload())
