"""Settings of the node and the workers, from the environment (prefix ``SPINE_TRIAGE_``).

The defaults are the *embedded mode*: SQLite, storage and a local broker under ``./var/``,
nothing to install but Python packages. Production sets a PostgreSQL URL and a Redis broker.

One group per concern (:mod:`.archive`, :mod:`.dicom`, :mod:`.queue`, :mod:`.triage`,
:mod:`.model`, :mod:`.delivery`, :mod:`.web`); :class:`Settings` is all of them, what a
process loads. Every field carries a description: ``.env.example`` and ``docs/settings.md``
are rendered from them (``spine-triage config env-example`` / ``config settings-doc``), so
they cannot drift.
"""

from __future__ import annotations

from typing import Any

from dicom_node.settings.archive import ArchiveSettings
from dicom_node.settings.audit import AuditSettings
from dicom_node.settings.base import ENV_PREFIX, CommaList, SettingsGroup
from dicom_node.settings.delivery import (
    DESTINATION_KINDS,
    CStoreDestination,
    DeliverySettings,
    DestinationSettings,
    FolderDestination,
    Hl7Destination,
    OrthancDestination,
    StowDestination,
    WebhookDestination,
)
from dicom_node.settings.dicom import DicomSettings
from dicom_node.settings.model import ModelSettings
from dicom_node.settings.queue import QueueSettings
from dicom_node.settings.triage import AutoRoiPolicy, TriageSettings
from dicom_node.settings.web import WebSettings

__all__ = [
    "DESTINATION_KINDS",
    "ENV_PREFIX",
    "ArchiveSettings",
    "AuditSettings",
    "AutoRoiPolicy",
    "CStoreDestination",
    "CommaList",
    "DeliverySettings",
    "DestinationSettings",
    "DicomSettings",
    "FolderDestination",
    "Hl7Destination",
    "ModelSettings",
    "OrthancDestination",
    "QueueSettings",
    "Settings",
    "SettingsGroup",
    "StowDestination",
    "TriageSettings",
    "WebSettings",
    "WebhookDestination",
    "load_settings",
]


class Settings(
    AuditSettings,
    WebSettings,
    DeliverySettings,
    ModelSettings,
    TriageSettings,
    QueueSettings,
    DicomSettings,
    ArchiveSettings,
):
    """All settings; see ``.env.example`` for the environment variable of each field."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``.env``), with explicit overrides on top."""
    return Settings(**overrides)
