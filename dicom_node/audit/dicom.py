"""Audit events of the DICOM service: studies received, associations refused.

*DICOM Instances Transferred* (A.5.3.7) describes one transfer of one patient's instances
between two application entities; IHE's ATNA grouping with the Radiology store transactions
reports it once per study per association, when the association ends (dcm4chee does the same).
:class:`AssociationAudit` therefore gathers, per association, the SOP classes and instance
counts stored per study, and writes one message per study when the connection closes (a
release, an abort or a dropped connection alike), with the minor-failure outcome when some of
that study's instances were refused. Studies sent again on a later association make a new
message: each is a transfer. STOW-RS requests are reported the same way, one per study per
request (:func:`dicom_node.audit.http.stow_received`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select

from dicom_node.archive.schema import Study
from dicom_node.audit import messages
from dicom_node.audit.messages import Codes, StudyRef
from dicom_node.audit.trail import AuditTrail

log = logging.getLogger(__name__)


@dataclass
class _Received:
    calling_ae: str
    peer_address: str | None
    stored: dict[str, Counter[str]] = field(default_factory=dict)  # study → SOP class → n
    refused: Counter[str] = field(default_factory=Counter)  # study → refused instances


class AssociationAudit:
    """Gathers what one listener stored per association; reports it when it ends."""

    def __init__(self, trail: AuditTrail, *, ae_title: str, allowed_calling_aes: Iterable[str]):
        self.trail = trail
        self.ae_title = ae_title
        self.allowed_calling_aes = frozenset(allowed_calling_aes)
        self._open: dict[object, _Received] = {}
        self._lock = threading.Lock()

    def _entry(self, assoc: object, calling_ae: str, peer_address: str | None) -> _Received:
        with self._lock:
            entry = self._open.get(assoc)
            if entry is None:
                entry = self._open[assoc] = _Received(calling_ae, peer_address)
            return entry

    def stored(
        self,
        assoc: object,
        *,
        calling_ae: str,
        peer_address: str | None,
        study_instance_uid: str | None,
        sop_class_uid: str | None,
        ok: bool,
    ) -> None:
        """One C-STORE answered (``ok``: Success)."""
        if not study_instance_uid:
            return
        entry = self._entry(assoc, calling_ae, peer_address)
        with self._lock:
            if ok:
                counts = entry.stored.setdefault(study_instance_uid, Counter())
                counts[sop_class_uid or "unknown"] += 1
            else:
                entry.refused[study_instance_uid] += 1

    def closed(self, assoc: object) -> None:
        """The association's connection closed: one message per study it carried."""
        with self._lock:
            entry = self._open.pop(assoc, None)
        if entry is None:
            return
        report(
            self.trail,
            entry.stored,
            entry.refused,
            calling_ae=entry.calling_ae,
            peer_address=entry.peer_address,
            called_ae=self.ae_title,
        )

    def refused(self, *, calling_ae: str, called_ae: str, peer_address: str | None) -> None:
        """An association request rejected (A-ASSOCIATE-RJ)."""
        if self.allowed_calling_aes and calling_ae not in self.allowed_calling_aes:
            reason = "calling AE title not allowed"
        elif called_ae != self.ae_title:
            reason = "called AE title not recognised"
        else:
            reason = "association rejected"
        association_refused(
            self.trail,
            calling_ae=calling_ae,
            peer_address=peer_address,
            description=f"{reason} (calling {calling_ae!r}, called {called_ae!r})",
        )


def association_refused(
    trail: AuditTrail, *, calling_ae: str, peer_address: str | None, description: str
) -> None:
    """Security Alert, Node Authentication failed: an association or TLS handshake refused."""
    trail.record(
        messages.security_alert(
            trail.source,
            kind=Codes.NODE_AUTHENTICATION,
            reporter=trail.source.source_id,
            subject=calling_ae or "unknown",
            subject_address=peer_address,
            description=description,
        )
    )


def report(
    trail: AuditTrail,
    stored: dict[str, Counter[str]],
    refused: Counter[str],
    *,
    calling_ae: str,
    peer_address: str | None,
    called_ae: str,
) -> None:
    """One *instances transferred* message per study received (or refused) from one sender."""
    uids = sorted(set(stored) | set(refused))
    if not uids:
        return
    known: dict[str, Study] = {}
    try:
        with trail.sessions() as session:
            rows = session.scalars(select(Study).where(Study.study_instance_uid.in_(uids)))
            known = {row.study_instance_uid: row for row in rows}
    except Exception as exc:  # the messages go out without the patient; the table says so
        log.error("audit: studies not read (%s)", type(exc).__name__)
    for uid in uids:
        study = known.get(uid)
        ref = StudyRef(
            study_instance_uid=uid,
            patient_id=study.patient_id if study else None,
            patient_name=study.patient_name if study else None,
            accession_number=study.accession_number if study else None,
            sop_classes=dict(stored.get(uid, {})),
        )
        failed = refused.get(uid, 0)
        if failed and uid in stored:
            outcome, description = messages.MINOR_FAILURE, f"{failed} instances refused"
        elif failed:
            outcome, description = messages.SERIOUS_FAILURE, f"{failed} instances refused"
        else:
            outcome, description = messages.SUCCESS, None
        trail.record(
            messages.instances_received(
                trail.source,
                ref,
                calling_ae=calling_ae,
                peer_address=peer_address,
                called_ae=called_ae,
                outcome=outcome,
                outcome_description=description,
            )
        )
