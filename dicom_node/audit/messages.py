"""DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA audit message format), as XML.

Each builder returns an :class:`AuditRecord`: the message exactly as the site's audit
repository receives it, with the fields the ``audit_event`` table indexes beside it. The
messages follow the schema of A.5.1 (``schema/audit-message.rnc``, validated in tests) and the
restrictions of A.5.3 for each event:

========================  ===========  ==================================================
event type                EventID      when
========================  ===========  ==================================================
application-activity      110100       node or worker started (110120) or stopped (110121)
audit-log-used            110101       ``spine-triage audit`` read the trail
instances-accessed        110103       a worklist detail, result or preview opened (R)
instances-transferred     110104       a study received on one association (C), an SR or
                                       derived series sent to a destination (R)
export                    110106       patient data exported from the node (a CSV/JSON
                                       download of results)
query                     110112       the worklist listed or searched (E)
security-alert            110113       an association refused (110126 Node Authentication),
                                       a write with a wrong token (110132 Use of Restricted
                                       Function)
user-authentication       110114       sign-in (110122 Login) or sign-out (110123 Logout),
                                       success or failure
========================  ===========  ==================================================

Only :mod:`xml.etree` is used to build them: no maintained Python library builds DICOM audit
messages (the Java toolkits, dcm4che's among them, do), and the format is small.
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

DCM = "DCM"
RFC_3881 = "RFC-3881"

# Outcome indicators (A.5.1): 0 success, 4 minor failure, 8 serious failure, 12 major failure.
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8
MAJOR_FAILURE = 12

# Study Root C-FIND: the SOP class a study-level worklist query stands for (A.5.3.10).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass(frozen=True)
class Code:
    """A coded value (CodedValueType): code, scheme and meaning."""

    code: str
    scheme: str
    meaning: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent,
            tag,
            {"csd-code": self.code, "codeSystemName": self.scheme, "originalText": self.meaning},
        )


class Codes:
    """The DICOM (DCM) and RFC 3881 codes the messages use (PS3.16, PS3.15 A.5)."""

    APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
    AUDIT_LOG_USED = Code("110101", DCM, "Audit Log Used")
    INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
    EXPORT = Code("110106", DCM, "Export")
    QUERY = Code("110112", DCM, "Query")
    SECURITY_ALERT = Code("110113", DCM, "Security Alert")
    USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

    APPLICATION_START = Code("110120", DCM, "Application Start")
    APPLICATION_STOP = Code("110121", DCM, "Application Stop")
    LOGIN = Code("110122", DCM, "Login")
    LOGOUT = Code("110123", DCM, "Logout")
    NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
    USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")

    APPLICATION = Code("110150", DCM, "Application")
    APPLICATION_LAUNCHER = Code("110151", DCM, "Application Launcher")
    DESTINATION = Code("110152", DCM, "Destination Role ID")
    SOURCE = Code("110153", DCM, "Source Role ID")
    DESTINATION_MEDIA = Code("110154", DCM, "Destination Media")

    STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
    SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")
    NODE_ID = Code("110182", DCM, "Node ID")
    PATIENT_NUMBER = Code("2", RFC_3881, "Patient Number")
    URI = Code("12", RFC_3881, "URI")


@dataclass(frozen=True)
class Participant:
    """An active participant: a person or process taking part in the event."""

    user_id: str
    requestor: bool
    role: Code | None = None
    user_name: str | None = None
    alternative_user_id: str | None = None
    address: str | None = None  # an IP address or host name (NetworkAccessPointID)

    def element(self, parent: ET.Element) -> None:
        attributes = {"UserID": self.user_id, "UserIsRequestor": _bool(self.requestor)}
        if self.alternative_user_id:
            attributes["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            attributes["UserName"] = self.user_name
        if self.address:
            attributes["NetworkAccessPointID"] = self.address
            attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.address) else "1"
        node = ET.SubElement(parent, "ActiveParticipant", attributes)
        if self.role is not None:
            self.role.element(node, "RoleIDCode")


@dataclass(frozen=True)
class StudyRef:
    """A study the event concerns; ``sop_classes`` counts its instances per SOP class."""

    study_instance_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    sop_classes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditSource:
    """Who reports the events: the node (its AE title) or a worker (its host name)."""

    source_id: str
    enterprise_site_id: str | None = None
    type_code: str = "4"  # application server process (A.5.1.2.1)


@dataclass(frozen=True)
class AuditRecord:
    """One audit event: its message and the fields the audit table indexes."""

    event_type: str
    event_time: datetime
    event_id: Code
    action: str
    outcome: int
    source_id: str
    message: str
    user_id: str | None = None
    client_address: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _token(value: str) -> str:
    """An xsd:token: no line breaks, tabs or runs of spaces (a patient name may hold '^')."""
    return " ".join(value.split())


def _message(
    *,
    event_type: str,
    event_id: Code,
    action: str,
    outcome: int,
    participants: Iterable[Participant],
    source: AuditSource,
    event_types: Iterable[Code] = (),
    outcome_description: str | None = None,
    objects: Iterable[ET.Element] = (),
    now: datetime | None = None,
    user_id: str | None = None,
    client_address: str | None = None,
    study: StudyRef | None = None,
    patient_id: str | None = None,
) -> AuditRecord:
    when = now or datetime.now(UTC)
    root = ET.Element("AuditMessage")
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": when.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(outcome),
        },
    )
    event_id.element(event, "EventID")
    for code in event_types:
        code.element(event, "EventTypeCode")
    if outcome_description:
        ET.SubElement(event, "EventOutcomeDescription").text = outcome_description
    for participant in participants:
        participant.element(root)
    audit_source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        {"AuditSourceID": _token(source.source_id) or "spine-triage"},
    )
    if source.enterprise_site_id:
        audit_source.set("AuditEnterpriseSiteID", _token(source.enterprise_site_id))
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": source.type_code})
    for element in objects:
        root.append(element)
    return AuditRecord(
        event_type=event_type,
        event_time=when,
        event_id=event_id,
        action=action,
        outcome=outcome,
        source_id=source.source_id,
        message=ET.tostring(root, encoding="unicode"),
        user_id=user_id,
        client_address=client_address,
        patient_id=study.patient_id if study else patient_id,
        study_instance_uid=study.study_instance_uid if study else None,
    )


def _object(
    object_id: str,
    id_type: Code,
    *,
    type_code: str,
    role: str | None = None,
    name: str | None = None,
    query: bytes | None = None,
    details: Mapping[str, str] | None = None,
    life_cycle: str | None = None,
) -> ET.Element:
    attributes = {"ParticipantObjectID": _token(object_id), "ParticipantObjectTypeCode": type_code}
    if role is not None:
        attributes["ParticipantObjectTypeCodeRole"] = role
    if life_cycle is not None:
        attributes["ParticipantObjectDataLifeCycle"] = life_cycle
    element = ET.Element("ParticipantObjectIdentification", attributes)
    id_type.element(element, "ParticipantObjectIDTypeCode")
    if query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    else:  # the schema asks for a name or a query
        ET.SubElement(element, "ParticipantObjectName").text = _token(name or object_id)
    for key, value in (details or {}).items():
        ET.SubElement(
            element,
            "ParticipantObjectDetail",
            {"type": key, "value": base64.b64encode(value.encode()).decode()},
        )
    return element


def _study_objects(study: StudyRef, *, life_cycle: str | None = None) -> list[ET.Element]:
    """The study (system object, report role) and its patient (person, patient role)."""
    element = _object(
        study.study_instance_uid,
        Codes.STUDY_INSTANCE_UID,
        type_code="2",
        role="3",
        life_cycle=life_cycle,
    )
    if study.accession_number or study.sop_classes:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        if study.accession_number:
            ET.SubElement(description, "Accession", {"Number": _token(study.accession_number)})
        for sop_class, count in sorted(study.sop_classes.items()):
            ET.SubElement(
                description, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)}
            )
    objects = [element]
    if study.patient_id:
        objects.append(
            _object(
                study.patient_id,
                Codes.PATIENT_NUMBER,
                type_code="1",
                role="1",
                name=study.patient_name or study.patient_id,
            )
        )
    return objects


def application_activity(
    source: AuditSource,
    *,
    started: bool,
    application: str,
    launcher: str | None = None,
    address: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.1: the node or a worker started or stopped (``launcher``: the OS user)."""
    participants = [
        Participant(application, False, Codes.APPLICATION, address=address),
    ]
    if launcher:
        participants.append(Participant(launcher, True, Codes.APPLICATION_LAUNCHER))
    return _message(
        event_type="application-activity",
        event_id=Codes.APPLICATION_ACTIVITY,
        action="E",
        outcome=SUCCESS,
        event_types=[Codes.APPLICATION_START if started else Codes.APPLICATION_STOP],
        participants=participants,
        source=source,
        now=now,
        user_id=launcher,
    )


def instances_received(
    source: AuditSource,
    study: StudyRef,
    *,
    calling_ae: str,
    peer_address: str | None,
    called_ae: str,
    node_address: str | None = None,
    outcome: int = SUCCESS,
    outcome_description: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.7, action C: one study's instances received from one sender (one association
    or one STOW-RS request)."""
    return _message(
        event_type="instances-transferred",
        event_id=Codes.INSTANCES_TRANSFERRED,
        action="C",
        outcome=outcome,
        outcome_description=outcome_description,
        participants=[
            Participant(calling_ae, True, Codes.SOURCE, address=peer_address),
            Participant(called_ae, False, Codes.DESTINATION, address=node_address),
        ],
        source=source,
        objects=_study_objects(study, life_cycle="2"),
        now=now,
        user_id=calling_ae,
        client_address=peer_address,
        study=study,
    )


def instances_sent(
    source: AuditSource,
    study: StudyRef,
    *,
    sender: str,
    destination: str,
    destination_address: str | None = None,
    outcome: int = SUCCESS,
    outcome_description: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.7, action R: the result SR (and its derived review series) sent to a
    destination; ``study.sop_classes`` counts what was sent."""
    return _message(
        event_type="instances-transferred",
        event_id=Codes.INSTANCES_TRANSFERRED,
        action="R",
        outcome=outcome,
        outcome_description=outcome_description,
        participants=[
            Participant(sender, True, Codes.SOURCE),
            Participant(destination, False, Codes.DESTINATION, address=destination_address),
        ],
        source=source,
        objects=_study_objects(study),
        now=now,
        user_id=sender,
        study=study,
    )


def instances_accessed(
    source: AuditSource,
    study: StudyRef,
    *,
    user: str,
    client_address: str | None,
    what: str,
    outcome: int = SUCCESS,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.6, action R: a person or process read a study's data (``what``: the route)."""
    element = _study_objects(study, life_cycle="6")
    return _message(
        event_type="instances-accessed",
        event_id=Codes.INSTANCES_ACCESSED,
        action="R",
        outcome=outcome,
        outcome_description=what,
        participants=[Participant(user, True, address=client_address)],
        source=source,
        objects=element,
        now=now,
        user_id=user,
        client_address=client_address,
        study=study,
    )


def query(
    source: AuditSource,
    *,
    user: str,
    client_address: str | None,
    responder: str,
    query_text: str,
    patient_id: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.10: a study-level query (the worklist list, QIDO-like); the query object holds
    the request's path and parameters, base64 as the schema asks."""
    objects = [
        _object(
            STUDY_ROOT_FIND,
            Codes.SOP_CLASS_UID,
            type_code="2",
            role="3",
            query=query_text.encode(),
        )
    ]
    return _message(
        event_type="query",
        event_id=Codes.QUERY,
        action="E",
        outcome=SUCCESS,
        participants=[
            Participant(user, True, Codes.SOURCE, address=client_address),
            Participant(responder, False, Codes.DESTINATION),
        ],
        source=source,
        objects=objects,
        now=now,
        user_id=user,
        client_address=client_address,
        patient_id=patient_id,
    )


def security_alert(
    source: AuditSource,
    *,
    kind: Code,
    reporter: str,
    subject: str,
    subject_address: str | None,
    description: str,
    user: str | None = None,
    outcome: int = MINOR_FAILURE,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.11: a refused association (Node Authentication) or a refused credential (Use
    of Restricted Function); ``subject`` is the refused node or token holder."""
    participants = [
        Participant(reporter, False),
        Participant(user or subject, True, address=subject_address),
    ]
    return _message(
        event_type="security-alert",
        event_id=Codes.SECURITY_ALERT,
        action="E",
        outcome=outcome,
        event_types=[kind],
        outcome_description=description,
        participants=participants,
        source=source,
        objects=[
            _object(
                f"{subject}@{subject_address}" if subject_address else subject,
                Codes.NODE_ID,
                type_code="2",
                role="13",
                name=subject,
            )
        ],
        now=now,
        user_id=user or subject,
        client_address=subject_address,
    )


def user_authentication(
    source: AuditSource,
    *,
    user: str,
    client_address: str | None,
    success: bool,
    logout: bool = False,
    authenticator: str | None = None,
    description: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.12: sign-in or sign-out of a person, success or failure (never the secret)."""
    participants = [Participant(user, True, address=client_address)]
    if authenticator:
        participants.append(Participant(authenticator, False))
    return _message(
        event_type="user-authentication",
        event_id=Codes.USER_AUTHENTICATION,
        action="E",
        outcome=SUCCESS if success else MINOR_FAILURE,
        event_types=[Codes.LOGOUT if logout else Codes.LOGIN],
        outcome_description=description,
        participants=participants,
        source=source,
        now=now,
        user_id=user,
        client_address=client_address,
    )


def export(
    source: AuditSource,
    studies: Iterable[StudyRef],
    *,
    user: str,
    client_address: str | None,
    destination: str,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.4 Data Export (EventID 110106, action R): patient data leaving the node's
    control other than by DICOM (a download of results); one patient per message."""
    refs = list(studies)
    objects: list[ET.Element] = []
    for ref in refs:
        objects.extend(_study_objects(ref, life_cycle="10"))
    first = refs[0] if refs else None
    return _message(
        event_type="export",
        event_id=Codes.EXPORT,
        action="R",
        outcome=SUCCESS,
        participants=[
            Participant(user, True, Codes.SOURCE, address=client_address),
            Participant(destination, False, Codes.DESTINATION_MEDIA),
        ],
        source=source,
        objects=objects,
        now=now,
        user_id=user,
        client_address=client_address,
        study=first,
    )


def audit_log_used(
    source: AuditSource,
    *,
    user: str,
    log_uri: str,
    now: datetime | None = None,
) -> AuditRecord:
    """A.5.3.2: the audit trail was read (``spine-triage audit``)."""
    return _message(
        event_type="audit-log-used",
        event_id=Codes.AUDIT_LOG_USED,
        action="R",
        outcome=SUCCESS,
        participants=[Participant(user, True)],
        source=source,
        objects=[_object(log_uri, Codes.URI, type_code="2", role="13", name="Security Audit Log")],
        now=now,
        user_id=user,
    )
