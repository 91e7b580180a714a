"""The schema exists only through Alembic migrations, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from dicom_node.archive.db import make_engine
from dicom_node.archive.migrate import current_revision, downgrade, head_revision, upgrade
from dicom_node.archive.schema import Base

TABLES = {"study", "series", "instance", "roi_annotation", "triage_result", "delivery"}


def test_upgrade_to_head_and_back_down(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(database_url)
        assert current_revision(engine) == head_revision()
        assert set(inspect(engine).get_table_names()) >= TABLES
        # the migrations produce exactly the models' schema: nothing to autogenerate
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        downgrade(database_url, "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(database_url)  # and up again
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
