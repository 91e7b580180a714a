"""The audit table takes new events and refuses to change or lose one, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.exc import DBAPIError

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AuditEvent


def _event() -> AuditEvent:
    return AuditEvent(
        event_time=datetime.now(UTC),
        event_type="query",
        event_id_code="110112",
        event_action="E",
        outcome=0,
        user_id="reader",
        client_address="127.0.0.1",
        patient_id="P1",
        study_instance_uid=None,
        source_id="node",
        message="<AuditMessage/>",
    )


def test_audit_events_are_append_only(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as session:
            session.add(_event())
        refused = pytest.raises(DBAPIError, match="append-only")
        with refused, transaction(factory) as session:
            session.execute(update(AuditEvent).values(user_id="someone else"))
        with pytest.raises(DBAPIError, match="append-only"), transaction(factory) as session:
            session.execute(delete(AuditEvent))
        with factory() as session:
            assert session.query(AuditEvent).one().user_id == "reader"
        if engine.dialect.name == "postgresql":
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(text("TRUNCATE audit_event"))
    finally:
        engine.dispose()
