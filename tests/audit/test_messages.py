"""Every audit message the product writes is valid against the DICOM audit message schema
(PS3.15 A.5.1) and says what A.5.3 asks of its event."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from lxml import etree

from dicom_node.audit import messages
from dicom_node.audit.messages import AuditRecord, AuditSource, Codes, StudyRef
from dicom_node.audit.syslog import BOM, format_rfc5424, octet_counted
from tests.audit.schema import assert_valid, audit_schema

SOURCE = AuditSource("SPINE_TRIAGE", enterprise_site_id="Hospital A")
STUDY = StudyRef(
    "1.2.826.0.1.3680043.8.498.1",
    patient_id="PID-42",
    patient_name="Doe^Jane",
    accession_number="ACC1",
    sop_classes={"1.2.840.10008.5.1.4.1.1.2": 120},
)
WHEN = datetime(2026, 12, 3, 14, 0, 0, 123000, tzinfo=UTC)


def _all_messages() -> dict[str, AuditRecord]:
    return {
        "application start": messages.application_activity(
            SOURCE, started=True, application="SPINE_TRIAGE", launcher="svc", address="node1"
        ),
        "application stop": messages.application_activity(
            SOURCE, started=False, application="worker w1@host"
        ),
        "study received": messages.instances_received(
            SOURCE, STUDY, calling_ae="CT_SCANNER", peer_address="10.0.0.5", called_ae="ST"
        ),
        "study partly refused": messages.instances_received(
            SOURCE,
            STUDY,
            calling_ae="CT",
            peer_address=None,
            called_ae="ST",
            outcome=messages.MINOR_FAILURE,
            outcome_description="3 instances refused",
        ),
        "study received, patient unknown": messages.instances_received(
            SOURCE,
            StudyRef("1.2.3"),
            calling_ae="CT",
            peer_address="::1",
            called_ae="ST",
        ),
        "SR sent": messages.instances_sent(
            SOURCE,
            STUDY,
            sender="w1@host",
            destination="pacs",
            destination_address="pacs.example.org",
        ),
        "detail opened": messages.instances_accessed(
            SOURCE, STUDY, user="dr.house", client_address="127.0.0.1", what="GET /worklist/1"
        ),
        "worklist listed": messages.query(
            SOURCE,
            user="anonymous",
            client_address="127.0.0.1",
            responder="SPINE_TRIAGE",
            query_text="/worklist?state=flagged&limit=50",
        ),
        "association refused": messages.security_alert(
            SOURCE,
            kind=Codes.NODE_AUTHENTICATION,
            reporter="SPINE_TRIAGE",
            subject="INTRUDER",
            subject_address="10.0.0.9",
            description="calling AE title not allowed",
        ),
        "token refused": messages.security_alert(
            SOURCE,
            kind=Codes.USE_OF_RESTRICTED_FUNCTION,
            reporter="SPINE_TRIAGE",
            subject="anonymous",
            subject_address="127.0.0.1",
            description="a bearer token is required for writes",
        ),
        "login ok": messages.user_authentication(
            SOURCE, user="dr.house", client_address="127.0.0.1", success=True
        ),
        "login failed": messages.user_authentication(
            SOURCE,
            user="dr.house",
            client_address="127.0.0.1",
            success=False,
            authenticator="SPINE_TRIAGE",
            description="wrong password",
        ),
        "logout": messages.user_authentication(
            SOURCE, user="dr.house", client_address="127.0.0.1", success=True, logout=True
        ),
        "export": messages.export(
            SOURCE, [STUDY], user="dr.house", client_address="127.0.0.1", destination="CSV"
        ),
        "audit log used": messages.audit_log_used(
            SOURCE, user="officer", log_uri="postgresql://db/audit_event"
        ),
    }


@pytest.mark.parametrize("name", sorted(_all_messages()))
def test_every_message_is_valid_against_the_dicom_audit_schema(name: str) -> None:
    assert_valid(_all_messages()[name].message)


def test_the_schema_refuses_what_it_should() -> None:
    record = _all_messages()["study received"]
    document = etree.fromstring(record.message.encode())
    document.find("EventIdentification").set("EventOutcomeIndicator", "3")
    assert not audit_schema().validate(document)
    document = etree.fromstring(record.message.encode())
    document.remove(document.find("AuditSourceIdentification"))
    assert not audit_schema().validate(document)


def test_study_received_names_both_ends_the_study_and_its_patient() -> None:
    record = _all_messages()["study received"]
    doc = assert_valid(record.message)
    event = doc.find("EventIdentification")
    assert event.find("EventID").get("csd-code") == "110104"
    assert event.get("EventActionCode") == "C"
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in doc.iter("ActiveParticipant")
    }
    assert roles == {"CT_SCANNER": "110153", "ST": "110152"}
    sender = next(p for p in doc.iter("ActiveParticipant") if p.get("UserID") == "CT_SCANNER")
    assert sender.get("NetworkAccessPointID") == "10.0.0.5"
    assert sender.get("NetworkAccessPointTypeCode") == "2"
    objects = {
        o.get("ParticipantObjectTypeCodeRole"): o
        for o in doc.iter("ParticipantObjectIdentification")
    }
    study, patient = objects["3"], objects["1"]
    assert study.get("ParticipantObjectID") == STUDY.study_instance_uid
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == ("1.2.840.10008.5.1.4.1.1.2", "120")
    assert patient.get("ParticipantObjectID") == "PID-42"
    assert patient.findtext("ParticipantObjectName") == "Doe^Jane"
    assert (record.patient_id, record.study_instance_uid) == ("PID-42", STUDY.study_instance_uid)
    assert doc.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "Hospital A"


@pytest.mark.parametrize(
    ("name", "event_id", "type_code", "outcome"),
    [
        ("application start", "110100", "110120", "0"),
        ("application stop", "110100", "110121", "0"),
        ("association refused", "110113", "110126", "4"),
        ("token refused", "110113", "110132", "4"),
        ("login ok", "110114", "110122", "0"),
        ("login failed", "110114", "110122", "4"),
        ("logout", "110114", "110123", "0"),
        ("detail opened", "110103", None, "0"),
        ("worklist listed", "110112", None, "0"),
        ("export", "110106", None, "0"),
        ("audit log used", "110101", None, "0"),
    ],
)
def test_event_codes(name: str, event_id: str, type_code: str | None, outcome: str) -> None:
    doc = assert_valid(_all_messages()[name].message)
    event = doc.find("EventIdentification")
    assert event.find("EventID").get("csd-code") == event_id
    assert event.get("EventOutcomeIndicator") == outcome
    types = [code.get("csd-code") for code in event.findall("EventTypeCode")]
    assert types == ([type_code] if type_code else [])


def test_a_query_carries_its_request_base64() -> None:
    doc = assert_valid(_all_messages()["worklist listed"].message)
    import base64

    query = doc.find("ParticipantObjectIdentification")
    assert query.get("ParticipantObjectID") == messages.STUDY_ROOT_FIND
    text = base64.b64decode(query.findtext("ParticipantObjectQuery")).decode()
    assert text == "/worklist?state=flagged&limit=50"


def test_rfc5424_frame() -> None:
    record = _all_messages()["login failed"]
    frame = format_rfc5424(
        record.message, timestamp=WHEN, sequence_id=17, hostname="node 1.example", procid=99
    )
    header, _, body = frame.partition(BOM)
    assert re.fullmatch(
        rb"<85>1 2026-12-03T14:00:00\.123000Z node1\.example spine-triage 99 IHE\+RFC-3881 "
        rb'\[meta sequenceId="17"\] ',
        header,
    ), header
    assert body.decode("utf-8") == record.message
    counted = octet_counted(frame)
    length, _, rest = counted.partition(b" ")
    assert int(length) == len(rest) == len(frame)
