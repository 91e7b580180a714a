"""Where the archive lives and when a study is complete."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from dicom_node.settings.base import SettingsGroup


class ArchiveSettings(SettingsGroup):
    """Database, storage, study completion."""

    database_url: str = Field(
        "",
        description=(
            "SQLAlchemy database URL. Empty: SQLite at VAR_DIR/spine-triage.db (embedded mode). "
            "Production: postgresql+psycopg2://user:password@host:5432/dbname."
        ),
    )
    storage_dir: Path | None = Field(
        None,
        description="Root of the DICOM file store (archive of record). Empty: VAR_DIR/storage.",
    )
    quiet_period_s: float = Field(
        30.0,
        gt=0,
        description=(
            "A study is complete when no instance of it arrived for this long (Orthanc's "
            "StableAge). An instance arriving later re-opens the study."
        ),
    )
    completion_check_interval_s: float = Field(
        1.0, gt=0, description="How often the node looks for studies that became complete (s)."
    )
    min_free_disk_mb: int = Field(
        512,
        ge=0,
        description="Below this much free space in STORAGE_DIR the node answers C-STORE with "
        "0xA700 (out of resources) so the sender retries later.",
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'spine-triage.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.var_dir / "storage").resolve()
