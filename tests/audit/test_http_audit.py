"""The HTTP service audits sign-ins, refused credentials, worklist queries and what each
caller opened, with who and which patient; every message valid against the schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.archive.schema import AuditEvent
from dicom_node.audit import AuditSource, AuditTrail
from dicom_node.web.auth import READER
from tests.audit.schema import assert_valid
from tests.signin.conftest import LEGACY_TOKEN, PATIENT_ID, Node, make_node


@pytest.fixture
def audited(tmp_path: Path, database_url: str) -> Iterator[Node]:
    for node in make_node(tmp_path, database_url):
        node.app.state.audit = AuditTrail(node.sessions, AuditSource("SPINE_TRIAGE", type_code="3"))
        yield node


def _events(node: Node) -> list[AuditEvent]:
    with node.sessions() as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    for event in events:
        assert_valid(event.message)
    return events


def test_sign_in_refusals_reads_and_sign_out_are_audited(audited: Node) -> None:
    node = audited
    browser = node.client()
    assert browser.post("/login", data={"username": READER, "password": "wrong"}).status_code == 401
    typed = browser.post("/login", data={"username": "my secret pw", "password": "x"})
    assert typed.status_code == 401
    client, csrf = node.signed_in(READER)
    assert client.get("/worklist").status_code == 200
    assert client.get("/worklist").status_code == 200  # the page's refresh: one query
    assert client.get(f"/worklist/{node.study_uid}").status_code == 200
    assert client.get(f"/results/{node.result_id}/preview.png").status_code == 200
    assert client.get("/worklist/1.2.3.4").status_code == 404  # nothing read: no event
    assert client.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert node.client("not-a-token").get("/worklist").status_code == 401
    assert node.client().get("/worklist").status_code == 401  # no credential: no alert
    assert node.client(LEGACY_TOKEN).get(f"/worklist/{node.study_uid}").status_code == 200
    assert node.client(LEGACY_TOKEN).get(f"/annotations/{node.annotation_id}").status_code == 200

    events = [(e.event_type, e.outcome, e.user_id, e.patient_id) for e in _events(node)]
    assert events == [
        ("user-authentication", 4, READER, None),
        ("user-authentication", 4, "unknown account", None),  # never what was typed
        ("user-authentication", 0, READER, None),
        ("query", 0, READER, None),
        ("instances-accessed", 0, READER, PATIENT_ID),
        ("instances-accessed", 0, READER, PATIENT_ID),
        ("user-authentication", 0, READER, None),
        ("security-alert", 4, "anonymous", None),
        ("instances-accessed", 0, events[-1][2], PATIENT_ID),
        ("instances-accessed", 0, events[-1][2], PATIENT_ID),  # the annotation and its result
    ]
    with node.sessions() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert "110123" in rows[6].message  # Logout
    assert all(row.client_address == "testclient" for row in rows)
    assert rows[4].study_instance_uid == node.study_uid == rows[5].study_instance_uid
    assert "my secret pw" not in "".join(row.message for row in rows)


def test_a_stow_request_is_one_transfer_per_study(audited: Node, tmp_path: Path) -> None:
    from io import BytesIO

    from pydicom.uid import generate_uid

    from dicom_node.dicom.ingest import StoreContext
    from dicom_node.dicom.storage import FileStore
    from dicom_node.web.auth import ANNOTATOR
    from tests.dicom_factory import ct_slice

    node = audited
    node.app.state.api.store_context = StoreContext(
        store=FileStore(tmp_path / "storage", min_free_bytes=0), sessions=node.sessions
    )
    study, series = str(generate_uid()), str(generate_uid())
    parts = []
    for index in range(3):
        buffer = BytesIO()
        ds = ct_slice(study_uid=study, series_uid=series, index=index, patient_id="PID-STOW")
        ds.save_as(buffer, enforce_file_format=True)
        parts.append(buffer.getvalue())
    parts.append(b"not DICOM")
    boundary = "audit-test"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    answer = node.client(node.token("pacs-bridge", ANNOTATOR)).post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert answer.status_code == 202, answer.text  # three stored, one refused
    transfers = [e for e in _events(node) if e.event_type == "instances-transferred"]
    assert [(e.study_instance_uid, e.patient_id, e.user_id, e.outcome) for e in transfers] == [
        (study, "PID-STOW", "pacs-bridge", 0)
    ]
    assert 'NumberOfInstances="3"' in transfers[0].message
