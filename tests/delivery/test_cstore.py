"""C-STORE delivery against real peers: Orthanc, and pynetdicom SCPs that answer on purpose."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage

from dicom_node.dicom.scu import StorePeer, status_kind, store_files
from dicom_node.settings import CStoreDestination
from tests.delivery.conftest import ResultStudy, orthanc_instances
from tests.services import Orthanc
from tests.support import free_port, require_binary
from worker.destinations.cstore import CStoreSender
from worker.errors import PermanentError, TransientError


def sender_for(ae_title: str, port: int, **options: Any) -> CStoreSender:
    config = CStoreDestination(
        name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, timeout_s=5, **options
    )
    return CStoreSender(config, node_ae_title="SPINE_TRIAGE")


def test_orthanc_stores_the_sr_once_when_it_is_sent_twice(
    pacs: Orthanc, result_study: ResultStudy
) -> None:
    sender = sender_for(pacs.aet, pacs.dicom_port)
    sender.send(result_study.payload())
    sender.send(result_study.payload(attempt=2))

    instances = orthanc_instances(pacs, result_study.study_instance_uid)
    assert len(instances) == 1
    with pacs.client() as client:
        stored = client.get(f"/instances/{instances[0]['ID']}/file")
    assert stored.status_code == 200
    copy = pydicom.dcmread(BytesIO(stored.content))
    assert copy.SOPInstanceUID == result_study.sr_sop_instance_uid
    assert copy.SOPClassUID == Comprehensive3DSRStorage
    assert copy.StudyInstanceUID == result_study.study_instance_uid


def test_stopped_orthanc_is_transient_and_the_sr_arrives_after_restart(
    orthanc_factory: Callable[..., Orthanc], result_study: ResultStudy
) -> None:
    server = orthanc_factory()
    sender = sender_for(server.aet, server.dicom_port)
    server.stop()
    with pytest.raises(TransientError, match="no association"):
        sender.send(result_study.payload())

    server.start()
    sender.send(result_study.payload(attempt=2))
    assert len(orthanc_instances(server, result_study.study_instance_uid)) == 1


@dataclass
class ScriptedScp:
    """A real pynetdicom storage SCP whose C-STORE answer a test chooses."""

    ae_title: str = "SCRIPTED"
    status: int = 0x0000
    received: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    sop_classes: tuple[str, ...] = (Comprehensive3DSRStorage,)
    ssl_context: ssl.SSLContext | None = None
    calling_aes: list[str] = field(default_factory=list)
    ae: AE | None = None

    def start(self) -> ScriptedScp:
        ae = AE(ae_title=self.ae_title)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class)
        ae.require_called_aet = True
        if self.calling_aes:
            ae.require_calling_aet = self.calling_aes
        ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
        )
        self.ae = ae
        return self

    def _handle_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self) -> None:
        if self.ae is not None:
            self.ae.shutdown()


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., ScriptedScp]]:
    started: list[ScriptedScp] = []

    def start(**options: Any) -> ScriptedScp:
        scp = ScriptedScp(**options).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0xB000, None),  # warning: coercion of data elements, stored
        (0xB007, None),
        (0xA700, TransientError),  # out of resources
        (0xA7FF, TransientError),
        (0x0110, TransientError),  # processing failure
        (0xA900, PermanentError),  # data set does not match SOP class
        (0xC000, PermanentError),  # cannot understand
        (0xC123, PermanentError),
        (0x0122, PermanentError),  # SOP class not supported
    ],
)
def test_c_store_status_decides_success_retry_or_failure(
    scp_factory: Callable[..., ScriptedScp],
    result_study: ResultStudy,
    status: int,
    outcome: type[Exception] | None,
) -> None:
    scp = scp_factory(status=status)
    sender = sender_for(scp.ae_title, scp.port)
    if outcome is None:
        sender.send(result_study.payload())
    else:
        with pytest.raises(outcome, match=f"0x{status:04X}"):
            sender.send(result_study.payload())
    assert scp.received == [result_study.sr_sop_instance_uid]


def test_status_kinds() -> None:
    assert status_kind(0x0000) == "success"
    assert status_kind(0x0001) == "warning"
    assert status_kind(0xB006) == "warning"
    assert status_kind(0xA701) == "transient"
    assert status_kind(0xFE00) == "transient"
    assert status_kind(0xA9FF) == "permanent"
    assert status_kind(0xCFFF) == "permanent"
    assert status_kind(0x0124) == "permanent"


def test_rejected_association_is_transient_with_the_reason(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy
) -> None:
    scp = scp_factory(calling_aes=["SOMEONE_ELSE"])
    with pytest.raises(
        TransientError, match=r"rejected the association.*Calling AE title not recognised"
    ):
        sender_for(scp.ae_title, scp.port).send(result_study.payload())
    assert scp.received == []


def test_peer_that_stores_no_sr_is_permanent(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy
) -> None:
    scp = scp_factory(sop_classes=(CTImageStorage,))
    with pytest.raises(PermanentError, match="accepted none"):
        sender_for(scp.ae_title, scp.port).send(result_study.payload())


def test_calling_ae_title_defaults_to_the_node_and_can_be_set(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy
) -> None:
    scp = scp_factory(calling_aes=["SPINE_TRIAGE"])
    sender_for(scp.ae_title, scp.port).send(result_study.payload())
    other = scp_factory(calling_aes=["TRIAGE_OUT"])
    sender_for(other.ae_title, other.port, calling_ae_title="TRIAGE_OUT").send(
        result_study.payload()
    )
    assert other.received == [result_study.sr_sop_instance_uid]


def test_missing_sr_file_is_permanent(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy, tmp_path: Path
) -> None:
    scp = scp_factory()
    with pytest.raises(PermanentError, match="does not exist"):
        sender_for(scp.ae_title, scp.port).send(result_study.payload(sr_path=tmp_path / "gone.dcm"))


def _certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "pacs.key", folder / "pacs.crt"
    subprocess.run(
        [
            require_binary("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pacs.test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_peer_verified_against_the_configured_ca(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy, tmp_path: Path
) -> None:
    cert, key = _certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    scp = scp_factory(ssl_context=server_context)

    sender_for(scp.ae_title, scp.port, tls=True, tls_ca_certificates=cert).send(
        result_study.payload()
    )
    assert scp.received == [result_study.sr_sop_instance_uid]

    # Without the CA the certificate cannot be verified: no association, retried later.
    with pytest.raises(TransientError):
        sender_for(scp.ae_title, scp.port, tls=True).send(result_study.payload())
    # A plain connection to a TLS port gets no association either.
    with pytest.raises(TransientError):
        sender_for(scp.ae_title, scp.port).send(result_study.payload())


def test_store_files_sends_several_files_over_one_association(
    scp_factory: Callable[..., ScriptedScp], result_study: ResultStudy, tmp_path: Path
) -> None:
    scp = scp_factory(sop_classes=(CTImageStorage, Comprehensive3DSRStorage))
    paths = []
    for index, content in enumerate(result_study.ct_part10()):
        path = tmp_path / f"ct-{index}.dcm"
        path.write_bytes(content)
        paths.append(path)
    paths.append(result_study.sr_path)
    peer = StorePeer(
        ae_title=scp.ae_title, host="127.0.0.1", port=scp.port, calling_ae_title="TEST"
    )
    outcomes = store_files(paths, peer)
    assert [outcome.sop_instance_uid for outcome in outcomes] == scp.received
    assert len(scp.received) == len(paths)
    assert all(outcome.status == 0 and not outcome.warning for outcome in outcomes)
