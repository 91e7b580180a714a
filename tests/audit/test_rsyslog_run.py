"""A whole run audited to a real rsyslog: a study sent by DCMTK storescu to a running node,
its result delivered by a worker, the worklist and a study's detail opened, a failed sign-in
and a refused token. The node sends over TLS (RFC 5425, client certificate), the worker over
UDP (RFC 5426); the daemon holds exactly the events of the audit table, message for message."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from dicom_node.archive.schema import AuditEvent
from tests.audit.rsyslog import Rsyslog
from tests.audit.schema import assert_valid
from tests.support import dcmtk_env, require_dcmtk
from tests.system import System, case_files

SystemFactory = Callable[..., System]


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    daemon = Rsyslog(tmp_path / "rsyslog").start()
    yield daemon
    daemon.stop()


def _events(system: System) -> list[AuditEvent]:
    with system.node.sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_a_whole_run_reaches_rsyslog_and_agrees_with_the_table(
    system_factory: SystemFactory,
    rsyslog: Rsyslog,
    synthetic_cases: list[Any],
    tmp_path: Path,
) -> None:
    pki = rsyslog.pki
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'audit-run.db'}",
        audit_syslog_host="127.0.0.1",
        audit_syslog_port=rsyslog.tls_port,
        audit_syslog_transport="tls",
        audit_syslog_ca_certificates=pki["ca"],
        audit_syslog_certificate=pki["client_cert"],
        audit_syslog_private_key=pki["client_key"],
    )
    # the worker reports over UDP
    system.env["SPINE_TRIAGE_AUDIT_SYSLOG_TRANSPORT"] = "udp"
    system.env["SPINE_TRIAGE_AUDIT_SYSLOG_PORT"] = str(rsyslog.udp_port)
    system.start_worker()
    case = synthetic_cases[0]
    sent = subprocess.run(
        [
            require_dcmtk("storescu"),
            "-aet",
            "CT_SCANNER",
            "-aec",
            system.settings.ae_title,
            "127.0.0.1",
            str(system.node.dicom_address[1]),
            *map(str, case_files(case)),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    system.post_roi(case.roi.to_json())
    system.wait_until(
        lambda: system.deliveries_delivered() == 1, timeout=300, what="the result delivered"
    )
    token = {"Authorization": f"Bearer {system.token}"}
    uid = case.roi.study_instance_uid
    with httpx.Client(base_url=system.api, timeout=30) as client:
        assert client.get("/worklist", headers=token).status_code == 200
        assert client.get(f"/worklist/{uid}", headers=token).status_code == 200
        refused = client.get("/worklist", headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        login = client.post(
            "/login",
            data={"username": "nobody", "password": "wrong password"},
            headers={"Origin": system.api},
        )
        assert login.status_code == 401
    system.stop()  # workers, HTTP, node: their stop events are sent before they exit

    events = _events(system)
    for event in events:
        assert_valid(event.message)
    received = rsyslog.wait_for(len(events))
    assert sorted(r.sequence_id for r in received) == [e.id for e in events]
    by_id = {r.sequence_id: r for r in received}
    for event in events:
        copy = by_id[event.id]
        assert copy.message == event.message
        assert (copy.pri, copy.msgid) == ("<85>", "IHE+RFC-3881")
        expected = "imudp" if ":" in event.source_id else "imtcp"  # a worker id is host:pid
        assert copy.transport == expected, (event.event_type, event.source_id)

    kinds = Counter((e.event_type, e.event_action, e.outcome) for e in events)
    assert kinds[("instances-transferred", "C", 0)] == 1  # the study, received once
    assert kinds[("instances-transferred", "R", 0)] == 1  # its SR (and review series) sent
    assert kinds[("instances-accessed", "R", 0)] == 1  # one detail view
    assert kinds[("query", "E", 0)] == 1
    assert kinds[("user-authentication", "E", 4)] == 1
    assert kinds[("security-alert", "E", 4)] == 1
    assert kinds[("application-activity", "E", 0)] == 4  # node and worker, start and stop
    received_study = next(e for e in events if e.event_action == "C")
    assert (received_study.user_id, received_study.study_instance_uid) == ("CT_SCANNER", uid)
    assert received_study.patient_id and received_study.patient_id in received_study.message
    worker_events = {e.event_type for e in events if ":" in e.source_id}
    assert worker_events == {"application-activity", "instances-transferred"}


def test_what_a_full_queue_dropped_is_sent_once_the_repository_is_back(
    node_factory: Callable[..., Any], tmp_path: Path
) -> None:
    from tests.audit.test_node_audit import _storescu, _study

    daemon = Rsyslog(tmp_path / "rsyslog")  # configured, not started: the repository is down
    node = node_factory(
        audit_syslog_host="127.0.0.1",
        audit_syslog_port=daemon.tls_port,
        audit_syslog_transport="tls",
        audit_syslog_ca_certificates=daemon.pki["ca"],
        audit_syslog_certificate=daemon.pki["client_cert"],
        audit_syslog_private_key=daemon.pki["client_key"],
        audit_queue_size=2,
    )
    trail = node.node.audit
    assert trail is not None and trail.forwarder is not None
    for number in range(5):
        _, files = _study(tmp_path / f"s{number}", 1, f"PID-{number}")
        assert _storescu(node.port, *files).returncode == 0
    assert trail.forwarder.stats.dropped >= 1 and trail.unsent >= 1
    daemon.start()
    try:
        with node.node.sessions() as session:
            ids = [e.id for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        received = daemon.wait_for(len(ids), timeout_s=90)
        assert sorted(r.sequence_id for r in received) == ids
        assert trail.unsent == 0 and trail.forwarder.stats.resent >= 1
    finally:
        daemon.stop()


def test_a_repository_refusing_the_client_certificate_gets_nothing_counted_as_sent(
    rsyslog: Rsyslog,
) -> None:
    import time
    from datetime import UTC, datetime

    from dicom_node.audit.syslog import SyslogForwarder, SyslogTarget, format_rfc5424

    # TLS 1.3: the server checks the client certificate after the client's handshake is done
    without = SyslogTarget("127.0.0.1", rsyslog.tls_port, "tls", ca_certificates=rsyslog.pki["ca"])
    forwarder = SyslogForwarder(without, retry_initial_s=0.1)
    frame = format_rfc5424("<AuditMessage/>", timestamp=datetime.now(UTC), sequence_id=1)
    forwarder.submit(frame)
    deadline = time.monotonic() + 20
    while forwarder.stats.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    forwarder.stop(0.5)
    assert forwarder.stats.failures >= 2
    assert forwarder.stats.sent == 0
    assert rsyslog.received() == []
