"""The broker that wakes the workers, and the rules of the job queue kept in the database."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from dicom_node.settings.base import SettingsGroup


class QueueSettings(SettingsGroup):
    """Broker, leases, attempts, sweeps."""

    broker_url: str = Field(
        "",
        description=(
            "Celery broker URL. Empty: a local filesystem transport under VAR_DIR/broker "
            "(embedded mode). Production: redis://host:6379/0."
        ),
    )
    broker_visibility_timeout_s: int = Field(
        3600,
        gt=0,
        description="Redis: a task not acknowledged within this time is redelivered. Keep it "
        "above the longest job.",
    )
    job_lease_s: float = Field(
        600.0,
        gt=0,
        description="A worker's claim on an annotation expires after this long; another worker "
        "may then take it over.",
    )
    job_max_attempts: int = Field(
        5, ge=1, description="Attempts of one annotation before it is failed for good."
    )
    sweeper_interval_s: float = Field(
        15.0,
        gt=0,
        description="How often the sweeper re-enqueues ready work whose message was lost and "
        "expired claims (s).",
    )

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "spinefs://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem transport."""
        return (self.var_dir / "broker").resolve()

    @property
    def is_embedded(self) -> bool:
        return not self.broker_url
