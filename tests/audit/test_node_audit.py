"""The node audits what it received and refused, on SQLite and PostgreSQL, and a repository
that does not answer never slows ingest."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.archive.schema import AuditEvent
from tests.audit.schema import assert_valid
from tests.dicom_factory import ct_slice
from tests.node.conftest import RunningNode
from tests.support import dcmtk_env, require_dcmtk

NodeFactory = Callable[..., RunningNode]


def _study(folder: Path, count: int, patient_id: str) -> tuple[str, list[Path]]:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    paths = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid, series_uid=series_uid, index=index, patient_id=patient_id
        )
        path = folder / f"ct{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def _storescu(
    port: int, *files: Path, calling: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_dcmtk("storescu"),
            "-aet",
            calling,
            "-aec",
            "SPINE_TRIAGE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _events(node: RunningNode) -> list[AuditEvent]:
    with node.node.sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_one_transfer_message_per_study_per_association_and_refusals(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(allowed_calling_aes="MODALITY")
    first, first_files = _study(tmp_path / "a", 3, "PID-A")
    second, second_files = _study(tmp_path / "b", 2, "PID-B")
    done = _storescu(node.port, *first_files, *second_files)
    assert done.returncode == 0, done.stderr
    refused = _storescu(node.port, first_files[0], calling="INTRUDER")
    assert refused.returncode != 0
    done = _storescu(node.port, first_files[0])  # the same study again: a second transfer
    assert done.returncode == 0, done.stderr
    node.node.stop()

    events = _events(node)
    for event in events:
        assert_valid(event.message)
    kinds = [event.event_type for event in events]
    assert kinds[0] == "application-activity" and kinds[-1] == "application-activity"
    assert "110120" in events[0].message and "110121" in events[-1].message
    transfers = [e for e in events if e.event_type == "instances-transferred"]
    # one per study of the first association, then the study sent again: a new transfer
    assert sorted((e.study_instance_uid, e.patient_id) for e in transfers[:2]) == sorted(
        [(first, "PID-A"), (second, "PID-B")]
    )
    assert [(e.study_instance_uid, e.patient_id) for e in transfers[2:]] == [(first, "PID-A")]
    by_study = {e.study_instance_uid: e for e in transfers[:2]}
    assert 'NumberOfInstances="3"' in by_study[first].message
    assert 'NumberOfInstances="2"' in by_study[second].message
    assert all(e.user_id == "MODALITY" and e.event_action == "C" for e in transfers)
    assert all(e.client_address == "127.0.0.1" and e.outcome == 0 for e in transfers)
    alerts = [e for e in events if e.event_type == "security-alert"]
    assert len(alerts) == 1
    assert alerts[0].user_id == "INTRUDER" and "110126" in alerts[0].message
    assert "calling AE title not allowed" in alerts[0].message


class Blackhole:
    """A TCP server that accepts connections and never answers (a hung repository)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_hung_audit_repository_never_holds_up_ingest(
    node_factory: NodeFactory, tmp_path: Path, blackhole: Blackhole
) -> None:
    node = node_factory(
        audit_syslog_host="127.0.0.1",
        audit_syslog_port=blackhole.port,
        audit_syslog_transport="tls",
        audit_queue_size=2,
    )
    trail = node.node.audit
    assert trail is not None and trail.forwarder is not None
    studies = []
    for number in range(6):
        uid, files = _study(tmp_path / f"s{number}", 1, f"PID-{number}")
        studies.append(uid)
        done = _storescu(node.port, *files)
        assert done.returncode == 0, done.stderr
    # Every study stored and audited in the table while the sender is still stuck in its
    # first TLS handshake with a repository that never answers.
    assert blackhole.connections, "the sender never tried the repository"

    # A transfer is recorded (row, then queue) when its association is released, which the
    # sender may see before the node's release handler has run: wait for the last, briefly.
    # 1 start + 6 studies recorded; one in the sender's hands, 2 queued, the rest dropped.
    forwarder = trail.forwarder

    def received() -> list[str]:
        return sorted(
            e.study_instance_uid for e in _events(node) if e.event_type == "instances-transferred"
        )

    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and (
        received() != sorted(studies) or forwarder.stats.dropped < 7 - 1 - 2
    ):
        time.sleep(0.05)
    assert received() == sorted(studies)
    stats = forwarder.stats
    assert stats.sent == 0
    assert stats.dropped >= 7 - 1 - 2
    from prometheus_client import CollectorRegistry, generate_latest

    from dicom_node.audit import AuditCounters

    registry = CollectorRegistry()
    registry.register(AuditCounters())
    text = generate_latest(registry).decode()
    dropped = next(
        line
        for line in text.splitlines()
        if line.startswith("spine_triage_audit_syslog_dropped_total")
    )
    assert float(dropped.split()[-1]) >= stats.dropped
