"""Bad input at every door: bytes thrown at the DICOM port, malformed objects sent by C-STORE,
broken series at inference time, REST writes without a token or with bad JSON. Each is refused
with its reason, nothing of it is stored, no patient data reaches the logs, and the node keeps
serving the next good peer."""

from __future__ import annotations

import functools
import io
import json
import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import make_engine, make_session_factory
from dicom_node.http import start_http
from dicom_node.ingest import StoreContext
from dicom_node.migrate import upgrade
from dicom_node.node import make_store
from dicom_node.schema import AnnotationState, Instance, RoiAnnotation, Series, Study
from dicom_node.settings import Settings
from tests.dicom_factory import ct_slice
from tests.node import conftest as node_fixtures
from tests.support import free_port, require_binary
from tests.system import System, case_files

node_factory = node_fixtures.node_factory  # the node suite's fixture, shared here
NodeFactory = Callable[..., node_fixtures.RunningNode]
VERIFICATION = UID("1.2.840.10008.1.1")
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

PATIENT_NAME = "Leakcheck^Wilhelmina"
PATIENT_ID = "PID-LEAKCHECK-4711"
TIMEOUT_S = 2.0  # the node's network and ACSE timeouts in the DICOM tests


def _patient_slice() -> Dataset:
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def _counts(node: node_fixtures.RunningNode) -> list[int]:
    """Rows of studies, series and instances."""
    with node.node.sessions() as session:
        return [
            int(session.scalar(select(func.count(table.id))) or 0)
            for table in (Study, Series, Instance)
        ]


def _files(root: Path, *, skip: Path | None = None) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not (skip and p.is_relative_to(skip))}


def _associate(port: int, *contexts: tuple[str, str]) -> tuple[AE, Any]:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    for abstract, syntax in contexts or ((CTImageStorage, ExplicitVRLittleEndian),):
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINE_TRIAGE")
    assert assoc.is_established, "the node refused a good association"
    return ae, assoc


def _echo_and_store_good(port: int) -> tuple[int, int]:
    """C-ECHO and C-STORE of a good slice over a fresh association: their statuses."""
    ae, assoc = _associate(port, (VERIFICATION, ExplicitVRLittleEndian))
    try:
        echo = int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
        ae.shutdown()
    ae, assoc = _associate(port)
    try:
        return echo, int(assoc.send_c_store(_patient_slice()).Status)
    finally:
        assoc.release()
        ae.shutdown()


# --- 1. bytes thrown at the DICOM port -------------------------------------------------------


@functools.cache
def _association_request() -> bytes:
    """An A-ASSOCIATE-RQ PDU exactly as pynetdicom sends it (Verification and CT contexts)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(VERIFICATION)
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.network_timeout = 2
        requester = threading.Thread(
            target=ae.associate,
            args=("127.0.0.1", server.getsockname()[1]),
            kwargs={"ae_title": "SPINE_TRIAGE"},
        )
        requester.start()
        connection, _ = server.accept()
        with connection, connection.makefile("rb") as stream:
            connection.settimeout(5)
            header = stream.read(6)
            pdu = header + stream.read(struct.unpack(">L", header[2:6])[0])
        requester.join(timeout=10)
        ae.shutdown()
    return pdu


def _pdu(pdu_type: int, length: int, tail: bytes = b"") -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length) + tail


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU with one presentation data value item."""
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return _pdu(0x04, len(item), item)


@st.composite
def _mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(("overwrite", "insert", "delete", "extreme")))
        if action == "overwrite" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        else:  # a length-like field set to an extreme value
            data[at : at + 2] = draw(st.sampled_from((b"\x00\x00", b"\xff\xff", b"\x7f\xff")))
    return bytes(data)


def _payloads() -> st.SearchStrategy[bytes]:
    request = _association_request()
    lengths = st.sampled_from((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF))
    p_data = st.builds(_p_data, st.integers(0, 255), st.integers(0, 255), st.binary(max_size=256))
    return st.one_of(
        st.binary(max_size=2048),  # random bytes
        _mutated(request),  # a valid A-ASSOCIATE-RQ, mutated
        st.integers(0, len(request) - 1).map(lambda n: request[:n]),  # truncated
        st.builds(_pdu, st.integers(0, 255), lengths, st.binary(max_size=64)),  # absurd lengths
        p_data,  # P-DATA before any association
        st.builds(lambda tail: request + tail, p_data | st.binary(max_size=512)),  # after one
    )


def _throw(port: int, payload: bytes) -> None:
    """Send ``payload``, half-close, and wait until the node closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S + 8) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return  # the node dropped the connection: also an answer
        except TimeoutError:
            pytest.fail(f"the node kept a connection open after {payload[:32]!r}")


@SQLITE_ONLY
def test_random_and_mutated_bytes_leave_the_node_serving(node_factory: NodeFactory) -> None:
    node = node_factory(network_timeout_s=TIMEOUT_S, acse_timeout_s=TIMEOUT_S)
    threads_before = threading.active_count()
    request = _association_request()

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=_payloads())
    @example(payload=b"")
    @example(payload=_p_data(1, 0x03, b"\x00" * 64))  # P-DATA before association
    @example(payload=_pdu(0x01, 0xFFFFFFFF, request[6:]))  # absurd A-ASSOCIATE-RQ length
    @example(payload=request[: len(request) // 2])  # truncated A-ASSOCIATE-RQ
    @example(payload=request + _p_data(1, 0x03, b"\xff" * 300))  # garbage command set
    def campaign(payload: bytes) -> None:
        _throw(node.port, payload)

    started = time.monotonic()
    campaign()
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 15  # association threads end within the timeouts
    while threading.active_count() > threads_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= threads_before + 2, threading.enumerate()
    assert _files(node.storage) == set()
    assert _counts(node) == [0, 0, 0]
    assert _echo_and_store_good(node.port) == (0, 0)
    assert _counts(node) == [1, 1, 1]


@SQLITE_ONLY
def test_peers_that_stop_mid_pdu_are_cut_off_and_free_their_slots(
    node_factory: NodeFactory,
) -> None:
    """As many stalled peers as the association limit: each is closed after the network
    timeout, never answered, and then a good peer is served."""
    openings = [
        b"\x01\x00\x00",  # half a PDU header
        _pdu(0x01, 0xFFFFFFFF, b"x" * 10),  # a 4 GiB PDU that never comes
        _association_request()[:100],  # a request cut short
    ]
    node = node_factory(
        network_timeout_s=TIMEOUT_S, acse_timeout_s=TIMEOUT_S, max_associations=len(openings)
    )
    stalled = [socket.create_connection(("127.0.0.1", node.port)) for _ in openings]
    started = time.monotonic()
    try:
        for sock, opening in zip(stalled, openings, strict=True):
            sock.settimeout(TIMEOUT_S + 8)
            sock.sendall(opening)
        for sock in stalled:
            try:
                assert sock.recv(1024) == b""
            except TimeoutError:
                pytest.fail("a stalled peer held its association past the network timeout")
    finally:
        for sock in stalled:
            sock.close()
    assert time.monotonic() - started < TIMEOUT_S + 6
    assert _echo_and_store_good(node.port) == (0, 0)


@SQLITE_ONLY
def test_a_silent_peer_does_not_stall_a_tls_listener(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    command = [require_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes"]
    command += ["-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    timeout_s = 4.0
    node = node_factory(
        tls_certificate=cert,
        tls_private_key=key,
        network_timeout_s=timeout_s,
        acse_timeout_s=timeout_s,
    )
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        time.sleep(0.2)  # accepted; its TLS handshake never starts
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        context.check_hostname = False
        ae = AE(ae_title="PACS")
        ae.add_requested_context(VERIFICATION)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 2 * timeout_s
        started = time.monotonic()
        assoc = ae.associate(
            "127.0.0.1", node.port, ae_title="SPINE_TRIAGE", tls_args=(context, "127.0.0.1")
        )
        try:
            assert assoc.is_established
            assert time.monotonic() - started < timeout_s - 1  # not after the silent peer
            assert int(assoc.send_c_echo().Status) == 0
        finally:
            assoc.release()
            ae.shutdown()
        silent.settimeout(timeout_s + 8)
        assert silent.recv(1024) == b""  # and the silent peer is cut off


# --- 2. malformed DICOM by C-STORE -----------------------------------------------------------
# Each builder turns a good slice into the dataset bytes to send; the command then carries the
# slice's SOP Instance UID and transfer syntax as the builder left them.

Build = Callable[[Dataset], bytes]


def _encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset as C-STORE carries it: the Part 10 encoding without preamble and meta."""
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    (meta_length,) = struct.unpack("<L", data[140:144])
    return data[144 + meta_length :]


def _at(body: bytes, group: int, element: int) -> int:
    """Offset of an element in a little endian dataset (its first occurrence)."""
    offset = body.find(struct.pack("<HH", group, element))
    assert offset >= 0, f"({group:04X},{element:04X}) not found"
    return offset


def _short_length(group: int, element: int, length: int) -> Build:
    """Declare another 2-byte length for an explicit VR element of a short VR."""

    def build(ds: Dataset) -> bytes:
        body = _encoded(ds)
        at = _at(body, group, element)
        return body[: at + 6] + struct.pack("<H", length) + body[at + 8 :]

    return build


def _cut(keep: Callable[[bytes], int], syntax: str = ExplicitVRLittleEndian) -> Build:
    return lambda ds: (body := _encoded(ds, syntax))[: keep(body)]


def _compressed(*, cut: int = 0, fragments: list[bytes] | None = None) -> Build:
    """JPEG 2000: the last ``cut`` bytes cut off, or the fragments replaced."""

    def build(ds: Dataset) -> bytes:
        ds.compress(JPEG2000Lossless)
        if fragments is not None:
            ds.PixelData = encapsulate(fragments)
        body = _encoded(ds)
        return body[: len(body) - cut]

    return build


def _changed(**values: Any) -> Build:
    def build(ds: Dataset) -> bytes:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return _encoded(ds)

    return build


def _pixels_declared_4gib(ds: Dataset) -> bytes:
    body = _encoded(ds)
    at = _at(body, 0x7FE0, 0x0010)
    return body[: at + 8] + struct.pack("<L", 0xFFFFFFF0) + body[at + 12 :]


def _header_element_declared_4gib(ds: Dataset) -> bytes:
    body = _encoded(ds)
    at = _at(body, 0x0008, 0x0020)  # Study Date, right after the SOP Instance UID
    return body[:at] + struct.pack("<HH2sHL", 0x0008, 0x001A, b"OB", 0, 0xFFFFFFF0) + body[at:]


def _command_names_another_instance(ds: Dataset) -> bytes:
    body = _encoded(ds)
    ds.SOPInstanceUID = generate_uid()
    return body


def _without_pixels(ds: Dataset) -> bytes:
    del ds.PixelData
    return _encoded(ds)


ESCAPE = "1.2/../../../escaped"
MALFORMED = [
    pytest.param(_cut(lambda b: _at(b, 0x0020, 0x000D) + 9), 0xC210, id="truncated in header"),
    pytest.param(_cut(lambda b: len(b) - 1000), 0xC210, id="truncated in pixel data"),
    pytest.param(
        _cut(lambda b: len(b) - 700, ImplicitVRLittleEndian), 0xC210, id="truncated implicit VR"
    ),
    # what is left of a cut element header cannot be told from no Pixel Data at all
    pytest.param(_cut(lambda b: _at(b, 0x7FE0, 0x0010) + 6), 0xA900, id="cut pixel element"),
    pytest.param(_compressed(cut=40), 0xC210, id="truncated JPEG 2000"),
    pytest.param(_compressed(fragments=[]), 0xC210, id="JPEG 2000 without a fragment"),
    pytest.param(_short_length(0x0010, 0x0010, 0x100), 0xC210, id="Patient Name longer"),
    # the misaligned rest parses as a dataset without Pixel Data
    pytest.param(_short_length(0x0028, 0x0010, 4), 0xA900, id="Rows as four bytes"),
    pytest.param(
        _changed(PixelData=bytes(1024)), 0xC210, id="pixel data shorter than Rows x Columns"
    ),
    pytest.param(_without_pixels, 0xA900, id="missing pixel data"),
    pytest.param(_pixels_declared_4gib, 0xC210, id="pixel data declared 4 GiB"),
    pytest.param(_header_element_declared_4gib, 0xC210, id="header element declared 4 GiB"),
    pytest.param(_changed(StudyInstanceUID="../../escaped"), 0xC210, id="study UID with .."),
    pytest.param(_changed(SeriesInstanceUID=ESCAPE), 0xC210, id="series UID with .."),
    pytest.param(_changed(SOPInstanceUID=ESCAPE), 0xC210, id="SOP Instance UID with .."),
    pytest.param(_command_names_another_instance, 0xC210, id="command names another instance"),
    pytest.param(
        lambda ds: bytes(np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8)),
        0xC210,
        id="not DICOM",
    ),
]


def _part10(sop_instance_uid: str, body: bytes, syntax: str) -> bytes:
    """A Part 10 file around dataset bytes as they are (file meta written by pydicom)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue() + body


@pytest.mark.parametrize(("build", "expected"), MALFORMED)
def test_malformed_object_is_refused_and_the_node_keeps_serving(
    node_factory: NodeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    build: Build,
    expected: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    # pynetdicom sends a file's dataset bytes as they are, UIDs of the command from its meta
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = node_factory(network_timeout_s=10, acse_timeout_s=10)
    sent = tmp_path / "sent"
    before = _files(tmp_path)
    ds = _patient_slice()
    body = build(ds)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    sent.mkdir()
    path = sent / "bad.dcm"
    path.write_bytes(_part10(str(ds.SOPInstanceUID), body, syntax))
    ae, assoc = _associate(node.port, (CTImageStorage, syntax))
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
        ae.shutdown()

    assert "Status" in status, "no C-STORE response"
    assert int(status.Status) == expected, status
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dicom_node") and r.levelno >= logging.WARNING
    ]
    assert any("refused" in message for message in refusals), refusals
    assert _counts(node) == [0, 0, 0]  # no orphan rows
    assert _files(tmp_path, skip=sent) == before  # nothing written, in storage or beside it

    assert _echo_and_store_good(node.port) == (0, 0)  # a new association is served
    new = _files(tmp_path, skip=sent) - before
    assert len(new) == 1 and next(iter(new)).is_relative_to(node.storage)
    assert _counts(node) == [1, 1, 1]
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


@SQLITE_ONLY
def test_well_formed_images_in_every_shape_are_still_accepted(
    node_factory: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pixel check must let through: Enhanced CT (all frames in one object),
    JPEG 2000 and RLE fragments, implicit VR."""
    from model.synth import make_case

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = node_factory()
    shape: dict[str, Any] = {"rows": 48, "columns": 48, "slices": 16, "slice_spacing_mm": 10.0}
    variants: list[dict[str, Any]] = [
        {"multiframe": True},
        {"multiframe": True, "transfer_syntax": "j2k"},
        {"transfer_syntax": "rle"},
    ]
    files = [
        path
        for number, options in enumerate(variants)
        for path in case_files(
            make_case(tmp_path, patient_id=f"S{number}", label="benign", seed=3, **shape, **options)
        )
    ]
    implicit = _patient_slice()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    files.append(tmp_path / "implicit.dcm")
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    contexts = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}
    ae, assoc = _associate(node.port, *sorted(contexts))
    try:
        assert [int(assoc.send_c_store(path).Status) for path in files] == [0] * len(files)
    finally:
        assoc.release()
        ae.shutdown()
    assert _counts(node)[2] == len(files)


# --- 3. broken series at inference time ------------------------------------------------------


def _drop_middle_slice(files: list[Path]) -> None:
    def height(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    sorted(files, key=height)[len(files) // 2].unlink()


def _tilt_one_slice(files: list[Path]) -> None:
    """One slice's Image Orientation (Patient) turned 10° in plane: a mixed series."""
    path = files[len(files) // 2]
    ds = pydicom.dcmread(path)
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (c, s, 0.0, -s, c, 0.0)]
    ds.save_as(path, enforce_file_format=True)


def test_broken_series_fail_with_their_reason_while_a_good_study_is_done(
    system_factory: Callable[..., System], tmp_path: Path
) -> None:
    from model.synth import make_case

    cases = {
        name: make_case(tmp_path / "cases", patient_id=name, label="malignant", seed=5)
        for name in ("GOOD", "GAP", "TILT")
    }
    _drop_middle_slice(case_files(cases["GAP"]))
    _tilt_one_slice(case_files(cases["TILT"]))
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'broken.db'}")
    system.start_worker()
    for case in cases.values():
        system.send_study(case_files(case))
    ids = {name: system.post_roi(cases[name].roi.to_json()) for name in ("GAP", "TILT", "GOOD")}
    ends = (AnnotationState.DONE, AnnotationState.FAILED)
    system.wait_until(
        lambda: all(system.annotation_states().get(i) in ends for i in ids.values()),
        timeout=180,
        what="every annotation to reach its end state",
    )
    views = {
        name: httpx.get(f"{system.api}/annotations/{annotation}", timeout=10).json()
        for name, annotation in ids.items()
    }
    assert views["GOOD"]["state"] == "done" and len(views["GOOD"]["results"]) == 1
    assert views["GAP"]["failure_reason"].startswith("MissingSliceError: ")
    assert "1 slice(s) missing" in views["GAP"]["failure_reason"]
    assert views["TILT"]["failure_reason"].startswith("MixedOrientationError: ")
    for name in ("GAP", "TILT"):
        assert views[name]["state"] == "failed" and views[name]["results"] == []
        assert views[name]["attempts"] == 1  # a permanent failure is not retried
    assert system.results_per_annotation() == {ids["GOOD"]: 1}


# --- 4. the REST API -------------------------------------------------------------------------

TOKEN = "bad-input-token"
GOOD_ROI: dict[str, Any] = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "slices_x_mm": [-3.0, 0.0, 3.0],
    "polygon_yz_mm": [[0.0, 0.0], [20.0, 0.0], [20.0, 20.0], [0.0, 20.0]],
}


@dataclass(frozen=True)
class Api:
    url: str
    app: Any
    sessions: sessionmaker[Session]

    def post(self, path: str, content: bytes, **headers: str) -> httpx.Response:
        headers.setdefault("Content-Type", "application/json")
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=10)

    def annotations_stored(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count(RoiAnnotation.id))) or 0)


@pytest.fixture
def api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Api]:
    """The real HTTP service (uvicorn on loopback) over a migrated SQLite database.

    Its error log is off: Python 3.11 formats a traceback with ``ast``, which is not thread
    safe (CPython gh-106905), and a server thread formatting a 500 while pytest formats the
    expected failure of an ``xfail`` test can abort the run (pytest-dev/pytest#10763).
    """
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        http_host="127.0.0.1",
        http_port=free_port(),
        api_token=TOKEN,
    )
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    context = StoreContext(store=make_store(settings), sessions=sessions)
    server = start_http(settings, sessions, None, store_context=context)
    caplog.set_level(logging.CRITICAL + 1, logger="uvicorn.error")
    try:
        yield Api(f"http://127.0.0.1:{server.port}", server.server.config.app, sessions)
    finally:
        server.stop()
        engine.dispose()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}"],
    ids=["absent", "empty", "no token", "wrong token", "token and more", "basic scheme"],
)
def test_writes_without_the_token_are_refused(api: Api, authorization: str | None) -> None:
    writes = sorted(
        (method, route.path)
        for route in api.app.routes
        for method in getattr(route, "methods", set()) & {"POST", "PUT", "PATCH", "DELETE"}
    )
    assert ("POST", "/annotations") in writes and ("POST", "/dicomweb/studies") in writes
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in writes:
        answer = httpx.request(
            method, f"{api.url}{path}", content=json.dumps(GOOD_ROI), headers=headers, timeout=10
        )
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert api.annotations_stored() == 0
    good = api.post("/annotations", json.dumps(GOOD_ROI).encode(), Authorization=f"Bearer {TOKEN}")
    assert good.status_code == 201 and api.annotations_stored() == 1


def test_an_unauthenticated_write_with_a_malformed_body_is_refused_as_such(api: Api) -> None:
    assert api.post("/annotations", b"{not json").status_code == 401


def _roi(**changes: Any) -> bytes:
    return json.dumps({**GOOD_ROI, **changes}).encode()


REQUIRED = ("study_instance_uid", "series_instance_uid", "slices_x_mm", "polygon_yz_mm")
# body, the locations of the errors expected, a word in every error's message
BAD_BODIES = [
    pytest.param(b'{"study_instance_uid": "1.2",', {("body", 29)}, "JSON", id="malformed JSON"),
    pytest.param(b"", {("body",)}, "required", id="empty body"),
    pytest.param(json.dumps([GOOD_ROI]).encode(), {("body",)}, "dictionary", id="a list"),
    pytest.param(_roi(study_instance_uid="1.2.03"), {("body", "study_instance_uid")}, "UID"),
    pytest.param(_roi(series_instance_uid="../../etc"), {("body", "series_instance_uid")}, "UID"),
    pytest.param(
        _roi(slices_x_mm=[float("nan"), 0.0, 3.0]), {("body", "slices_x_mm")}, "finite", id="NaN"
    ),
    pytest.param(
        _roi(polygon_yz_mm=[[0.0, 0.0], [float("inf"), 0.0], [0.0, 9.0]]),
        {("body", "polygon_yz_mm")},
        "finite",
        id="Infinity",
    ),
    pytest.param(_roi(slices_x_mm=["left", 0, 3]), {("body", "slices_x_mm", 0)}, "number"),
    pytest.param(_roi(polygon_yz_mm=[]), {("body", "polygon_yz_mm")}, "at least 3", id="empty"),
    pytest.param(
        _roi(polygon_yz_mm=[[0, 0], [5, 5], [10, 10]]),
        {("body", "polygon_yz_mm")},
        "no area",
        id="degenerate polygon",
    ),
    pytest.param(_roi(slices_x_mm=list(range(8))), {("body", "slices_x_mm")}, "at most 7"),
    pytest.param(_roi(slices_x_mm=[1, 1, 3]), {("body", "slices_x_mm")}, "distinct"),
    pytest.param(_roi(colour="red"), {("body", "colour")}, "Extra", id="unknown field"),
    pytest.param(
        b'{"vertebra": "L1"}', {("body", field) for field in REQUIRED}, "required", id="missing"
    ),
    pytest.param(
        _roi(study_instance_uid="x", polygon_yz_mm=[], colour="red"),
        {("body", "study_instance_uid"), ("body", "polygon_yz_mm"), ("body", "colour")},
        "",
        id="three errors at once",
    ),
]


@pytest.mark.parametrize(("body", "locations", "word"), BAD_BODIES)
def test_bad_json_is_refused_with_an_error_per_field(
    api: Api, body: bytes, locations: set[tuple[Any, ...]], word: str
) -> None:
    answer = api.post("/annotations", body, Authorization=f"Bearer {TOKEN}")
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert {tuple(error["loc"]) for error in errors} == locations
    assert all(word in error["msg"] for error in errors), errors
    assert api.annotations_stored() == 0


def test_stow_rs_refuses_malformed_images_per_instance(api: Api) -> None:
    """The HTTP door shares the ingest path: the same refusals, one per instance."""
    parts = []
    for build in (_encoded, _cut(lambda b: len(b) - 1000), _without_pixels):
        ds = _patient_slice()
        parts.append(_part10(ds.SOPInstanceUID, build(ds), ExplicitVRLittleEndian))
    boundary = "bad-input"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    answer = api.post(
        "/dicomweb/studies",
        body + f"--{boundary}--\r\n".encode(),
        **{
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {TOKEN}",
        },
    )
    assert answer.status_code == 202, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert sorted(item["00081197"]["Value"][0] for item in failed) == [0xA900, 0xC210]
    assert len(answer.json()["00081199"]["Value"]) == 1
