"""Bad input at the DICOM door: bytes thrown at the port and malformed objects sent by C-STORE.
Each is refused with its reason, nothing of it is stored, no patient data reaches the logs, and
the node keeps serving the next good peer. (Broken series: test_broken_series.py; the REST API:
test_bad_rest_input.py.)"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from sqlalchemy import func, select

from dicom_node.archive.schema import Instance, Series, Study
from tests.faults.malformed import (
    MALFORMED,
    PATIENT_ID,
    PATIENT_NAME,
    Build,
    part10,
    patient_slice,
)
from tests.node import conftest as node_fixtures
from tests.support import require_binary
from tests.system import case_files

node_factory = node_fixtures.node_factory  # the node suite's fixture, shared here
NodeFactory = Callable[..., node_fixtures.RunningNode]
VERIFICATION = UID("1.2.840.10008.1.1")
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
TIMEOUT_S = 2.0  # the node's network and ACSE timeouts in the DICOM tests


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
        return echo, int(assoc.send_c_store(patient_slice()).Status)
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


# --- 2. malformed DICOM by C-STORE (builders in malformed.py) ------------------------------


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
    ds = patient_slice()
    body = build(ds)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    sent.mkdir()
    path = sent / "bad.dcm"
    path.write_bytes(part10(str(ds.SOPInstanceUID), body, syntax))
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
    from model.synthetic.cases import make_case

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
    implicit = patient_slice()
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
