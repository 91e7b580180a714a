"""The audit trail: DICOM PS3.15 Annex A.5 audit messages (IHE ATNA).

Every event is written to the append-only ``audit_event`` table and, when the site has an
audit record repository, sent to it as RFC 5424 syslog over TLS or UDP without ever blocking
the path that caused it (:mod:`.trail`, :mod:`.syslog`). The messages are built in
:mod:`.messages` and follow ``schema/audit-message.rnc`` (PS3.15 A.5.1). The HTTP routes call
the one-line functions re-exported here (``audit.instances_accessed(request, study)``); the
DICOM service reports through :mod:`.dicom`. The audit trail is the one place access records
with patient IDs and names live: never in application logs.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.audit.http import (
    annotation_accessed,
    caller,
    client_address,
    credential_refused,
    export,
    instances_accessed,
    query,
    result_accessed,
    security_alert,
    stow_received,
    study_accessed,
    study_ref,
    user_authentication,
)
from dicom_node.audit.messages import AuditRecord, AuditSource, Codes, StudyRef
from dicom_node.audit.trail import AuditCounters, AuditTrail

SCHEMA_PATH = Path(__file__).parent / "schema" / "audit-message.rnc"

__all__ = [
    "SCHEMA_PATH",
    "AuditCounters",
    "AuditRecord",
    "AuditSource",
    "AuditTrail",
    "Codes",
    "StudyRef",
    "annotation_accessed",
    "caller",
    "client_address",
    "credential_refused",
    "export",
    "instances_accessed",
    "query",
    "result_accessed",
    "security_alert",
    "stow_received",
    "study_accessed",
    "study_ref",
    "user_authentication",
]
