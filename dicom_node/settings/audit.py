"""The audit trail (DICOM PS3.15 A.5 messages): the site's audit repository (IHE ATNA)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from dicom_node.settings.base import SettingsGroup


class AuditSettings(SettingsGroup):
    """Where audit messages go besides the audit table (which always holds every one)."""

    audit_syslog_host: str = Field(
        "",
        description="Host of the site's audit record repository (IHE ATNA): every audit event "
        "is sent there as RFC 5424 syslog besides being written to the audit table. Empty: "
        "the table only.",
    )
    audit_syslog_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the audit repository. Empty: 6514 for tls, 514 for udp.",
    )
    audit_syslog_transport: Literal["tls", "udp"] = Field(
        "tls",
        description="'tls' (RFC 5425, octet-counted frames over TLS 1.2+, what ATNA asks for) "
        "or 'udp' (RFC 5426, one datagram per message, unacknowledged).",
    )
    audit_syslog_ca_certificates: Path | None = Field(
        None,
        description="PEM CA bundle the audit repository's TLS certificate must chain to. "
        "Empty: the system's CAs.",
    )
    audit_syslog_certificate: Path | None = Field(
        None,
        description="PEM client certificate presented to the audit repository (ATNA node "
        "authentication). With AUDIT_SYSLOG_PRIVATE_KEY.",
    )
    audit_syslog_private_key: Path | None = Field(
        None, description="PEM private key of AUDIT_SYSLOG_CERTIFICATE."
    )
    audit_queue_size: int = Field(
        10_000,
        ge=1,
        description="Audit messages waiting to be sent, per process. When the repository is "
        "unreachable for that long, newer messages are not queued: they stay in the audit "
        "table and are sent from there once the queue has run empty (/metrics: "
        "spine_triage_audit_syslog_dropped_total, spine_triage_audit_syslog_unsent).",
    )
    audit_enterprise_site_id: str = Field(
        "",
        description="AuditEnterpriseSiteID of every audit message (the site's name or OID). "
        "Empty: left out.",
    )

    @model_validator(mode="after")
    def _audit_client_pair(self) -> Self:
        if (self.audit_syslog_certificate is None) != (self.audit_syslog_private_key is None):
            raise ValueError(
                "a client certificate needs both AUDIT_SYSLOG_CERTIFICATE and "
                "AUDIT_SYSLOG_PRIVATE_KEY"
            )
        return self

    @property
    def resolved_audit_syslog_port(self) -> int:
        if self.audit_syslog_port is not None:
            return self.audit_syslog_port
        return 6514 if self.audit_syslog_transport == "tls" else 514
