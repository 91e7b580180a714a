"""A RIS or worklist engine that receives the result as an HL7 v2.5.1 ORU^R01 over MLLP.

The message is built with the ``hl7`` library's containers (every field value escaped with
its escape helper) and sent with its asyncio MLLP client; the answer must be an ACK for this
message's control id:

- MSA-1 ``AA`` (or ``CA``): accepted;
- ``AE`` (or ``CE``): the receiver had an error: transient, retried, with the reason from
  MSA-3 or the ERR segment;
- ``AR`` (or ``CR``): rejected: permanent, with the reason;
- no answer, a timeout, a garbled or foreign answer: transient.

The message, segment by segment (``S`` when the study is flagged HIGH, else ``R``)::

    MSH  sending/receiving application and facility, time, ORU^R01^ORU_R01,
         control id "ST<delivery id>.<attempt>", P, 2.5.1, MSH-18 UNICODE UTF-8
    PID  PID-3 patient id, PID-5 patient name (DICOM PN mapped to XPN)
    ORC  RE, ORC-2/ORC-3 accession number, ORC-7 quantity/timing priority (^^^^^S)
    OBR  OBR-2/OBR-3 accession number, OBR-4 universal service id
         SPINE-AI-TRIAGE^AI triage: vertebral fracture malignancy^99SPT, OBR-5 priority,
         OBR-7 result time, OBR-18 accession number, OBR-24 CT, OBR-25 P (preliminary: a
         computer-aided triage result nobody has verified), OBR-27 priority (^^^^^S)
    NTE  "computer-aided triage, not a diagnosis"; the demonstration notice when it applies
    TQ1  TQ1-9 priority S^Stat^HL70485 or R^Routine^HL70485 (the v2.5 place for it)
    OBX  NM  111047^Probability of cancer^DCM  (patient probability, OBX-8 A when flagged)
    OBX  CE  111042^Pathology^DCM = 21594007^Malignant^SCT or 30807003^Benign^SCT
    OBX  ST  111001^Algorithm Name^DCM, 111003^Algorithm Version^DCM
    OBX  ST  DEMO-MODEL^Demonstration model, not for clinical use^99SPT = Y or N
    OBX  ST  110180^Study Instance UID^DCM, SR-SOP-UID / SR-SERIES-UID (99SPT)
    OBX  ST  363698007^Finding site^SCT = the vertebra, when known
    ZDS  Study Instance UID^SPINE_TRIAGE^Application^DICOM (the IHE pointer to the study)

Text goes out as UTF-8 (declared in MSH-18); separators, the escape character and line
breaks are escaped, other control characters become spaces.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from dicom_node.settings import Hl7Destination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

HL7_VERSION = "2.5.1"
CHARACTER_SET = "UNICODE UTF-8"
LOCAL_CODING_SYSTEM = "99SPT"
UNIVERSAL_SERVICE = ("SPINE-AI-TRIAGE", "AI triage: vertebral fracture malignancy")
CADT_NOTE = (
    "Computer-aided triage (CADt): the study is ordered for priority reading; "
    "this is not a diagnosis."
)
DEMONSTRATION_NOTE = "DEMONSTRATION MODEL - SYNTHETIC TRAINING DATA - NOT FOR CLINICAL USE"
PRIORITY_CODES = {"HIGH": ("S", "Stat"), "ROUTINE": ("R", "Routine")}
PATHOLOGY_CODES = {
    "malignant": ("21594007", "Malignant", "SCT"),
    "benign": ("30807003", "Benign", "SCT"),
}
ACCEPTED = frozenset({"AA", "CA"})
ERROR = frozenset({"AE", "CE"})
REJECTED = frozenset({"AR", "CR"})

_LINE_BREAK = re.compile(r"\r\n|\n")
_CONTROL = re.compile(r"[\x00-\x0c\x0e-\x1f\x7f]")
_NON_ASCII_RUN = re.compile(r"([^\x00-\x7f]+)")


def control_id(payload: DeliveryPayload) -> str:
    """MSH-10: unique per delivery attempt, the same text in the log and in the ACK."""
    return f"ST{payload.delivery_id}.{payload.attempt}"


def hl7_priority(payload: DeliveryPayload) -> str:
    """``S`` (stat) for a study flagged HIGH, ``R`` (routine) otherwise."""
    return PRIORITY_CODES.get(payload.priority, PRIORITY_CODES["ROUTINE"])[0]


class _Builder:
    """Segments of one message, every value escaped for that message's separators."""

    def __init__(self) -> None:
        self.message = hl7.Message(separator="\r", sequence=[])

    def text(self, value: str) -> str:
        value = _CONTROL.sub(" ", _LINE_BREAK.sub("\r", value))
        pieces = _NON_ASCII_RUN.split(value)  # odd positions: non-ASCII runs, sent as UTF-8
        return "".join(
            piece if index % 2 else self.message.escape(piece) for index, piece in enumerate(pieces)
        )

    def segment(self, name: str, fields: dict[int, str | tuple[str, ...] | None]) -> Any:
        """Append segment ``name``; a tuple value is a composite (components in order)."""
        segment = self.message.create_segment([self.message.create_field([name])])
        for number, value in sorted(fields.items()):
            if value is None or value == "" or value == ():
                continue
            if isinstance(value, tuple):
                while value and not value[-1]:
                    value = value[:-1]  # no trailing empty components
                for component, part in enumerate(value, start=1):
                    segment.assign_field(self.text(part), number, 1, component)
            else:
                segment.assign_field(self.text(value), number)
        self.message.append(segment)
        return segment

    def header(self, fields: dict[int, str | tuple[str, ...] | None]) -> None:
        segment = self.segment("MSH", fields)
        segment.assign_field("|", 1)
        segment.assign_field("^~\\&", 2)


def build_oru(
    payload: DeliveryPayload, config: Hl7Destination, *, now: datetime | None = None
) -> hl7.Message:
    """The ORU^R01 that reports ``payload`` (see the module docstring for its content)."""
    b = _Builder()
    sent_at = _hl7_time(now or datetime.now(UTC))
    observed_at = _hl7_time(payload.result_created_at)
    priority_code, priority_text = PRIORITY_CODES.get(payload.priority, PRIORITY_CODES["ROUTINE"])
    accession = payload.accession_number or None
    b.header(
        {
            3: _optional(config.sending_application),
            4: _optional(config.sending_facility),
            5: _optional(config.receiving_application),
            6: _optional(config.receiving_facility),
            7: sent_at,
            9: ("ORU", "R01", "ORU_R01"),
            10: control_id(payload),
            11: "P",
            12: HL7_VERSION,
            18: CHARACTER_SET,
        }
    )
    b.segment("PID", {1: "1", 3: payload.patient_id, 5: _person_name(payload.patient_name)})
    b.segment("ORC", {1: "RE", 2: accession, 3: accession, 7: ("", "", "", "", "", priority_code)})
    b.segment(
        "OBR",
        {
            1: "1",
            2: accession,
            3: accession,
            4: (*UNIVERSAL_SERVICE, LOCAL_CODING_SYSTEM),
            5: priority_code,
            7: observed_at,
            18: accession,
            22: observed_at,
            24: "CT",
            25: "P",
            27: ("", "", "", "", "", priority_code),
        },
    )
    notes = [CADT_NOTE] + ([DEMONSTRATION_NOTE] if payload.demonstration else [])
    for number, note in enumerate(notes, start=1):
        b.segment("NTE", {1: str(number), 2: "L", 3: note})
    b.segment("TQ1", {1: "1", 9: (priority_code, priority_text, "HL70485")})
    for number, (value_type, code, value, extra) in enumerate(_observations(payload), start=1):
        b.segment(
            "OBX",
            {
                1: str(number),
                2: value_type,
                3: code,
                5: value,
                6: extra.get("units"),
                8: extra.get("abnormal"),
                11: "P",
                14: observed_at,
            },
        )
    b.segment("ZDS", {1: (payload.study_instance_uid, "SPINE_TRIAGE", "Application", "DICOM")})
    return b.message


def _optional(value: str) -> str | None:
    return value or None


def _observations(
    payload: DeliveryPayload,
) -> list[tuple[str, tuple[str, ...], str | tuple[str, ...], dict[str, Any]]]:
    flagged = payload.priority == "HIGH"
    pathology = PATHOLOGY_CODES["malignant" if payload.label == "malignant" else "benign"]
    abnormal = "A" if flagged else None
    rows: list[tuple[str, tuple[str, ...], str | tuple[str, ...], dict[str, Any]]] = [
        (
            "NM",
            ("111047", "Probability of cancer", "DCM"),
            f"{payload.patient_probability:.4f}",
            {"units": ("1", "no units", "UCUM"), "abnormal": abnormal},
        ),
        ("CE", ("111042", "Pathology", "DCM"), pathology, {"abnormal": abnormal}),
        ("ST", ("111001", "Algorithm Name", "DCM"), payload.model_name, {}),
        ("ST", ("111003", "Algorithm Version", "DCM"), payload.model_version, {}),
        (
            "ST",
            ("DEMO-MODEL", "Demonstration model, not for clinical use", LOCAL_CODING_SYSTEM),
            "Y" if payload.demonstration else "N",
            {},
        ),
        ("ST", ("110180", "Study Instance UID", "DCM"), payload.study_instance_uid, {}),
        (
            "ST",
            ("SR-SOP-UID", "Result SR SOP Instance UID", LOCAL_CODING_SYSTEM),
            payload.sr_sop_instance_uid,
            {},
        ),
        (
            "ST",
            ("SR-SERIES-UID", "Result SR Series Instance UID", LOCAL_CODING_SYSTEM),
            payload.sr_series_instance_uid,
            {},
        ),
    ]
    if payload.vertebra:
        rows.append(("ST", ("363698007", "Finding site", "SCT"), payload.vertebra, {}))
    return rows


def _person_name(dicom_name: str | None) -> tuple[str, ...] | None:
    """DICOM PN (family^given^middle^prefix^suffix) → HL7 XPN (family^given^middle^suffix^
    prefix); only the alphabetic group of a PN with ideographic/phonetic groups."""
    if not dicom_name:
        return None
    parts = [*dicom_name.split("=")[0].split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = parts
    if not any(parts):
        return None
    return (family, given, middle, suffix, prefix)


def _hl7_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the database keeps UTC
    return moment.strftime("%Y%m%d%H%M%S%z")


def check_ack(answer: bytes, expected_control_id: str) -> None:
    """Raise unless ``answer`` (an MLLP block's content) accepts message ``expected_control_id``."""
    text = answer.decode("utf-8", errors="replace").strip("\r\n ")
    if not text.startswith("MSH"):
        raise TransientError(f"the answer is not an HL7 message: {text[:40]!r}")
    try:
        ack = hl7.parse(text)
        msa = ack.segment("MSA")
    except KeyError as exc:
        raise TransientError("the answer has no MSA segment") from exc
    except (hl7.HL7Exception, ValueError, IndexError) as exc:
        raise TransientError(f"unreadable answer: {exc}") from exc
    code = str(msa.extract_field(1, 1)).strip().upper()
    acknowledged = str(msa.extract_field(1, 2)).strip()
    if acknowledged != expected_control_id:
        raise TransientError(
            f"the ACK is for message {acknowledged!r}, not {expected_control_id!r}"
        )
    if code in ACCEPTED:
        return
    reason = _ack_reason(ack, msa)
    if code in ERROR:
        raise TransientError(f"the receiver answered {code} (application error): {reason}")
    if code in REJECTED:
        raise PermanentError(f"the receiver answered {code} (rejected): {reason}")
    raise TransientError(f"unknown acknowledgment code {code!r}: {reason}")


def _ack_reason(ack: Any, msa: Any) -> str:
    text = str(msa.extract_field(1, 3)).strip()
    if text:
        return text
    try:
        err = ack.segment("ERR")
    except KeyError:
        return "no reason given"
    for field, component in ((8, 1), (3, 2), (3, 1), (1, 1)):
        try:
            value = str(err.extract_field(1, field, 1, component)).strip()
        except IndexError:
            continue
        if value:
            return value
    return "no reason given"


async def _exchange(host: str, port: int, block: bytes, timeout_s: float) -> bytes:
    """Send one MLLP block and read the answer block, each step within ``timeout_s``."""
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(host, port, encoding="utf-8"), timeout_s
    )
    try:
        writer.writeblock(block)
        await asyncio.wait_for(writer.drain(), timeout_s)
        answer: bytes = await asyncio.wait_for(reader.readblock(), timeout_s)
        return answer
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout_s)
        except (OSError, TimeoutError) as exc:
            logger.debug("closing the MLLP connection: %s", exc)


def _run_coroutine(coroutine: Coroutine[Any, Any, bytes]) -> bytes:
    """Run ``coroutine`` to completion from synchronous code, even inside an event loop's
    thread (there, in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllp") as pool:
        return pool.submit(asyncio.run, coroutine).result()


class Hl7OruSender:
    """Sends the ORU^R01 of a result to one MLLP listener and checks its ACK."""

    kind = "hl7"

    def __init__(self, config: Hl7Destination) -> None:
        self.name = config.name
        self.config = config

    def send(self, payload: DeliveryPayload) -> None:
        message = build_oru(payload, self.config)
        message_id = control_id(payload)
        block = str(message).encode("utf-8")
        try:
            answer = _run_coroutine(
                _exchange(self.config.host, self.config.port, block, self.config.timeout_s)
            )
        except TimeoutError as exc:
            raise TransientError(
                f"{self.name}: no answer within {self.config.timeout_s:g} s"
            ) from exc
        except asyncio.IncompleteReadError as exc:
            raise TransientError(f"{self.name}: connection closed before an answer") from exc
        except (InvalidBlockError, ValueError) as exc:
            raise TransientError(f"{self.name}: garbled MLLP answer: {exc}") from exc
        except OSError as exc:
            raise TransientError(
                f"{self.name}: cannot reach {self.config.host}:{self.config.port}: {exc}"
            ) from exc
        try:
            check_ack(answer, message_id)
        except (TransientError, PermanentError) as exc:
            raise type(exc)(f"{self.name}: {exc}") from exc
        logger.info(
            "%s: ORU^R01 %s accepted (priority %s) delivery=%d",
            self.name,
            message_id,
            hl7_priority(payload),
            payload.delivery_id,
        )
