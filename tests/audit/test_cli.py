"""``spine-triage audit`` lists and filters the trail, and its reading is audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AuditEvent
from dicom_node.audit import AuditSource, AuditTrail, StudyRef, messages
from tests.audit.schema import assert_valid

ROOT = Path(__file__).resolve().parents[2]
SOURCE = AuditSource("SPINE_TRIAGE")


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
    env["SPINE_TRIAGE_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "audit", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_audit_lists_and_filters_by_patient_user_type_and_time(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    engine = make_engine(url)
    trail = AuditTrail(make_session_factory(engine), SOURCE)
    old = datetime.now(UTC) - timedelta(days=10)
    a = StudyRef("1.2.3.1", patient_id="PID-A", patient_name="A^A")
    b = StudyRef("1.2.3.2", patient_id="PID-B", patient_name="B^B")
    trail.record(
        messages.instances_accessed(
            SOURCE, a, user="ann", client_address="10.0.0.1", what="GET", now=old
        )
    )
    trail.record(
        messages.instances_accessed(SOURCE, b, user="bob", client_address="10.0.0.2", what="GET")
    )
    trail.record(
        messages.instances_accessed(SOURCE, a, user="bob", client_address="10.0.0.2", what="GET")
    )
    trail.record(
        messages.user_authentication(SOURCE, user="bob", client_address="10.0.0.2", success=False)
    )
    trail.close()

    def ids(*args: str) -> list[tuple[str, str | None, str | None]]:
        done = _cli(url, "--json", *args)
        assert done.returncode == 0, done.stderr
        return [(e["type"], e["user"], e["patient_id"]) for e in json.loads(done.stdout)]

    accessed = "instances-accessed"
    assert ids("--patient", "PID-A") == [(accessed, "ann", "PID-A"), (accessed, "bob", "PID-A")]
    assert ids("--user", "bob", "--type", "user-authentication") == [
        ("user-authentication", "bob", None)
    ]
    assert ids("--patient", "PID-A", "--since", (old + timedelta(days=1)).date().isoformat()) == [
        (accessed, "bob", "PID-A")
    ]
    assert ids("--patient", "PID-A", "--until", old.date().isoformat()) == [
        (accessed, "ann", "PID-A")
    ]
    assert ids("--failures", "--type", "user-authentication") == [
        ("user-authentication", "bob", None)
    ]
    full = json.loads(_cli(url, "--json", "--messages", "--study", "1.2.3.2").stdout)
    assert len(full) == 1 and "B^B" in full[0]["message"]
    table = _cli(url, "--patient", "PID-B")
    assert table.returncode == 0 and "PID-B" in table.stdout and "bob" in table.stdout

    bad = _cli(url, "--since", "yesterday")
    assert bad.returncode == 2 and "not a date" in bad.stderr
    with make_session_factory(engine)() as session:
        reads = list(
            session.scalars(select(AuditEvent).where(AuditEvent.event_type == "audit-log-used"))
        )
    assert len(reads) == 7  # each listing above, not the refused one
    assert_valid(reads[0].message)
    engine.dispose()
