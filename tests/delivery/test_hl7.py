"""HL7 ORU^R01 over MLLP against a real listener built on the hl7 library's asyncio server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import hl7
import pytest

from dicom_node.settings import Hl7Destination
from tests.delivery.conftest import MODEL_NAME, MODEL_VERSION, ResultStudy
from tests.services import MllpListener
from tests.support import free_port
from worker.destinations.hl7 import DEMONSTRATION_NOTE, Hl7OruSender, build_oru, check_ack
from worker.errors import PermanentError, TransientError


@pytest.fixture
def listener() -> Iterator[MllpListener]:
    server = MllpListener().start()
    yield server
    server.stop()


def field(segment: Any, number: int, component: int = 1) -> str:
    """Unescaped value of one field (component) of a parsed segment."""
    return str(segment.extract_field(1, number, 1, component))


def by_code(message: hl7.Message) -> dict[str, Any]:
    """OBX segments by the code of their observation identifier (OBX-3.1)."""
    return {field(obx, 3): obx for obx in message.segments("OBX")}


def sender_for(port: int, **options: Any) -> Hl7OruSender:
    values: dict[str, Any] = {
        "name": "ris",
        "host": "127.0.0.1",
        "port": port,
        "receiving_application": "RIS",
        "receiving_facility": "GENERAL",
        "sending_facility": "RADIOLOGY",
        "timeout_s": 2,
    }
    values.update(options)
    return Hl7OruSender(Hl7Destination(**values))


def test_malignant_result_is_an_oru_with_stat_priority(
    listener: MllpListener, result_study: ResultStudy
) -> None:
    payload = result_study.payload(delivery_id=41, attempt=3)
    sender_for(listener.port).send(payload)

    assert len(listener.received) == 1
    message = listener.received[0]
    assert message["MSH.F9.R1.C1"] == "ORU"
    assert message["MSH.F9.R1.C2"] == "R01"
    assert message["MSH.F10"] == "ST41.3"
    assert message["MSH.F5"] == "RIS"
    assert message["MSH.F12"] == "2.5.1"
    assert message["PID.F3"] == payload.patient_id
    assert message["PID.F5.R1.C1"] == "Synthetic"
    assert message["PID.F5.R1.C2"] == "Spine"
    assert message["ORC.F2"] == message["OBR.F3"] == payload.accession_number
    assert message["OBR.F5"] == "S"
    assert message["ORC.F7.R1.C6"] == "S"
    assert message["OBR.F27.R1.C6"] == "S"
    assert message["TQ1.F9.R1.C1"] == "S"
    assert message["ZDS.F1.R1.C1"] == payload.study_instance_uid
    observations = by_code(message)
    probability = observations["111047"]
    assert field(probability, 2) == "NM"
    assert float(field(probability, 5)) == pytest.approx(payload.patient_probability, abs=1e-4)
    assert field(probability, 8) == "A"
    pathology = observations["111042"]
    assert field(pathology, 2) == "CE"
    assert field(pathology, 5, 1) == "21594007"
    assert field(pathology, 5, 2) == "Malignant"
    assert field(observations["111001"], 5) == MODEL_NAME
    assert field(observations["111003"], 5) == MODEL_VERSION
    assert field(observations["110180"], 5) == payload.study_instance_uid
    assert field(observations["SR-SOP-UID"], 5) == payload.sr_sop_instance_uid
    assert field(observations["DEMO-MODEL"], 5) == "N"


def test_benign_result_is_routine_and_a_demonstration_says_so(
    listener: MllpListener, result_study_factory: Any
) -> None:
    study = result_study_factory(probability=0.12)
    sender_for(listener.port).send(study.payload(demonstration=True))

    message = listener.received[0]
    assert message["OBR.F5"] == "R"
    assert message["ORC.F7.R1.C6"] == "R"
    assert message["TQ1.F9.R1.C1"] == "R"
    assert "|S|" not in listener.raw[0].split("\r")[3]  # nothing marks it stat
    observations = by_code(message)
    assert field(observations["111042"], 5, 2) == "Benign"
    assert field(observations["111047"], 8) == ""
    assert field(observations["DEMO-MODEL"], 5) == "Y"
    notes = [field(nte, 3) for nte in message.segments("NTE")]
    assert DEMONSTRATION_NOTE in notes


def test_field_content_is_escaped(listener: MllpListener, result_study: ResultStudy) -> None:
    payload = result_study.payload(
        patient_name="O'Brien|Smith^Zoë&Ann~X\\Y",
        patient_id="ID|^~\\&1",
        accession_number="A&B\nC",
    )
    sender_for(listener.port).send(payload)

    message = listener.received[0]
    assert len(message.segments("PID")) == 1
    assert message["PID.F3"] == "ID|^~\\&1"
    assert message["PID.F5.R1.C1"] == "O'Brien|Smith"
    assert message["PID.F5.R1.C2"] == "Zoë&Ann~X\\Y"
    assert message["OBR.F3"] == "A&B\rC"  # the line break travels escaped as \.br\
    assert "\\.br\\" in listener.raw[0]


@pytest.mark.parametrize(
    ("mode", "error", "pattern"),
    [
        ("AE", TransientError, "AE.*database locked"),
        ("AR", PermanentError, "AR.*unknown patient"),
        ("silent", TransientError, "no answer within"),
        ("garbled", TransientError, "not an HL7 message"),
        ("foreign", TransientError, "ACK is for message"),
    ],
)
def test_negative_and_missing_answers(
    listener: MllpListener,
    result_study: ResultStudy,
    mode: str,
    error: type[Exception],
    pattern: str,
) -> None:
    listener.mode = mode
    listener.reason = {"AE": "database locked", "AR": "unknown patient"}.get(mode, "")
    with pytest.raises(error, match=pattern):
        sender_for(listener.port, timeout_s=1).send(result_study.payload())
    assert len(listener.received) == 1


def test_listener_down_is_transient(result_study: ResultStudy) -> None:
    with pytest.raises(TransientError, match="cannot reach"):
        sender_for(free_port()).send(result_study.payload())


def test_ack_reason_from_err_segment() -> None:
    ack = (
        "MSH|^~\\&|RIS||ST||20240301||ACK^R01^ACK|9|P|2.5.1\r"
        "MSA|AR|ST1.1\r"
        "ERR|||207^Application internal error^HL70357|E||||Order not found\r"
    )
    with pytest.raises(PermanentError, match="Order not found"):
        check_ack(ack.encode(), "ST1.1")
    check_ack(ack.replace("MSA|AR", "MSA|AA").encode(), "ST1.1")
    check_ack(ack.replace("MSA|AR", "MSA|CA").encode(), "ST1.1")


def test_oru_round_trips_through_the_parser(result_study: ResultStudy) -> None:
    config = Hl7Destination(name="ris", host="127.0.0.1", port=2575)
    text = str(build_oru(result_study.payload(patient_name=None, accession_number=None), config))
    parsed = hl7.parse(text)
    assert [str(segment(0)) for segment in parsed] == [
        "MSH",
        "PID",
        "ORC",
        "OBR",
        "NTE",
        "TQ1",
        *["OBX"] * 9,
        "ZDS",
    ]
    assert parsed["MSH.F18"] == "UNICODE UTF-8"
    assert parsed["PID.F5"] == ""
    assert parsed["OBR.F2"] == ""


def test_send_works_from_inside_an_event_loop(
    listener: MllpListener, result_study: ResultStudy
) -> None:
    async def deliver() -> None:
        sender_for(listener.port).send(result_study.payload())

    asyncio.run(deliver())
    assert len(listener.received) == 1
