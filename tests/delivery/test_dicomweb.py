"""STOW-RS delivery and the DICOMweb client (QIDO-RS, WADO-RS) against a real Orthanc."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage

from dicom_node.dicom.dicomweb import DicomwebEndpoint, DicomwebError, DicomwebPeer
from dicom_node.settings import StowDestination
from tests.delivery.conftest import ResultStudy, orthanc_instances, upload_to_orthanc
from tests.services import Orthanc
from tests.support import free_port
from worker.destinations.stow import StowSender
from worker.errors import PermanentError, TransientError


def stow_sender(url: str, **options: Any) -> StowSender:
    return StowSender(StowDestination(name="pacs-web", url=url, timeout_s=5, **options))


def endpoint_of(server: Orthanc) -> DicomwebEndpoint:
    return DicomwebEndpoint(
        url=server.dicomweb_url, username=server.user, password=server.password, timeout_s=10
    )


def test_stow_stores_the_sr_in_its_study_found_by_qido(
    pacs: Orthanc, result_study: ResultStudy
) -> None:
    upload_to_orthanc(pacs, result_study.ct_part10())
    sender = stow_sender(pacs.dicomweb_url, username=pacs.user, password=pacs.password)
    sender.send(result_study.payload())
    sender.send(result_study.payload(attempt=2))  # a re-send is harmless

    with DicomwebPeer(endpoint_of(pacs)) as peer:
        found = peer.search_instances(result_study.study_instance_uid)
        reports = peer.search_instances(result_study.study_instance_uid, filters={"Modality": "SR"})
    classes = sorted(str(item.SOPClassUID) for item in found)
    assert classes == sorted([CTImageStorage] * len(result_study.ct) + [Comprehensive3DSRStorage])
    assert [str(item.SOPInstanceUID) for item in reports] == [result_study.sr_sop_instance_uid]
    assert len(orthanc_instances(pacs, result_study.study_instance_uid)) == len(result_study.ct) + 1


def test_wado_retrieve_passes_every_instance_of_the_study_to_the_callback(
    pacs: Orthanc, result_study: ResultStudy
) -> None:
    upload_to_orthanc(pacs, [*result_study.ct_part10(), result_study.sr_path.read_bytes()])
    received: list[bytes] = []
    with DicomwebPeer(endpoint_of(pacs)) as peer:
        count = peer.retrieve_study(result_study.study_instance_uid, received.append)
        series = peer.search_series(result_study.study_instance_uid, filters={"Modality": "CT"})
        series_count = peer.retrieve_series(
            result_study.study_instance_uid, str(series[0].SeriesInstanceUID), lambda _: None
        )
    assert count == len(received) == len(result_study.ct) + 1
    assert series_count == len(result_study.ct)
    copies = {}
    for content in received:
        assert content[128:132] == b"DICM"  # Part-10 files, ready for the file store
        dataset = pydicom.dcmread(BytesIO(content))
        copies[str(dataset.SOPInstanceUID)] = dataset
    originals = {str(image.SOPInstanceUID): image for image in result_study.ct}
    for uid, original in originals.items():
        assert copies[uid].PixelData == original.PixelData
        assert copies[uid].file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copies[result_study.sr_sop_instance_uid].SOPClassUID == Comprehensive3DSRStorage


def test_wrong_password_is_permanent(pacs: Orthanc, result_study: ResultStudy) -> None:
    sender = stow_sender(pacs.dicomweb_url, username=pacs.user, password="wrong")
    with pytest.raises(PermanentError, match="401"):
        sender.send(result_study.payload())


def test_unknown_study_retrieve_is_an_error_not_an_empty_success(pacs: Orthanc) -> None:
    with DicomwebPeer(endpoint_of(pacs)) as peer, pytest.raises(DicomwebError) as caught:
        peer.retrieve_study("1.2.3.4.5.6.7.8.9", lambda _: None)
    assert caught.value.http_status == 404
    assert not caught.value.transient


def test_pacs_down_is_transient(result_study: ResultStudy) -> None:
    sender = stow_sender(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(TransientError, match="ConnectionError"):
        sender.send(result_study.payload())


class _ScriptedStow(BaseHTTPRequestHandler):
    """Answers STOW-RS as a test asks and records the Authorization header it got."""

    answers: list[tuple[int, bytes]]
    authorizations: list[str | None]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        self.authorizations.append(self.headers.get("Authorization"))
        status, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep the test output quiet


@pytest.fixture
def scripted_stow() -> Iterator[Callable[..., tuple[str, type[_ScriptedStow]]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(answers: list[tuple[int, bytes]]) -> tuple[str, type[_ScriptedStow]]:
        handler = type(
            "Handler", (_ScriptedStow,), {"answers": list(answers), "authorizations": []}
        )
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _failed(uid: str, reason: int) -> bytes:
    answer = pydicom.Dataset()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = Comprehensive3DSRStorage
    item.ReferencedSOPInstanceUID = uid
    item.FailureReason = reason
    answer.FailedSOPSequence = [item]
    return answer.to_json().encode()


def test_failed_sop_sequence_reasons_and_http_statuses_are_classified(
    scripted_stow: Callable[..., tuple[str, type[_ScriptedStow]]], result_study: ResultStudy
) -> None:
    uid = result_study.sr_sop_instance_uid
    url, handler = scripted_stow(
        [
            (409, _failed(uid, 0xA700)),  # out of resources: retry
            (409, _failed(uid, 0xC000)),  # cannot understand: give up
            (202, _failed(uid, 0xA900)),  # accepted with failures
            (503, b""),
            (429, b""),
            (400, b""),
            (200, b""),  # no body: stored
        ]
    )
    sender = stow_sender(url, bearer_token="s3cret-token")
    with pytest.raises(TransientError, match="0xA700"):
        sender.send(result_study.payload())
    with pytest.raises(PermanentError, match="0xC000"):
        sender.send(result_study.payload())
    with pytest.raises(PermanentError, match="0xA900"):
        sender.send(result_study.payload())
    with pytest.raises(TransientError, match="503"):
        sender.send(result_study.payload())
    with pytest.raises(TransientError, match="429"):
        sender.send(result_study.payload())
    with pytest.raises(PermanentError, match="400"):
        sender.send(result_study.payload())
    sender.send(result_study.payload())
    assert handler.authorizations == ["Bearer s3cret-token"] * 7


def test_endpoint_refuses_two_kinds_of_credentials() -> None:
    with pytest.raises(ValueError, match="not both"):
        DicomwebEndpoint(url="http://pacs/dicom-web", username="a", password="b", bearer_token="t")
    with pytest.raises(ValueError, match="http"):
        DicomwebEndpoint(url="pacs/dicom-web")
