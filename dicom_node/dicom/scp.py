"""The node's DICOM service: C-ECHO and C-STORE, durable before Success.

The C-STORE handler is a plain function with its dependencies passed in (pynetdicom's
``evt_handlers`` style) and answers with DIMSE status codes instead of raising:

* ``0x0000`` Success: the bytes as received are fsynced in storage and the index committed;
* ``0xA700`` Out of resources: disk full (or below its reserve); nothing is left behind;
* ``0xC000``-range: the dataset cannot be understood (bad UID, unreadable header: ``0xC210``)
  or the database is unavailable (``0xC001``); nothing is left behind; the sender retries.

Pixel data are never decoded on the receive path: ``event.encoded_dataset()`` goes to disk
through :func:`dicom_node.dicom.ingest.store_instance`, the path STOW-RS shares.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit.dicom import AssociationAudit, association_refused
from dicom_node.dicom.ingest import (
    SR_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SUCCESS,
    STORAGE_SOP_CLASSES,
    SrReceived,
    StoreContext,
    store_instance,
)
from dicom_node.dicom.pynetdicom_private import (
    quiet_standard_handlers,
    register_server,
    set_poll_interval,
)
from dicom_node.settings import Settings

__all__ = [
    "SR_SOP_CLASSES",
    "STORAGE_SOP_CLASSES",
    "DicomService",
    "SrReceived",
    "StoreContext",
    "handle_store",
]

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")

# Every transfer syntax a CT or SR commonly arrives in; stored exactly as received. When a
# sender offers several in one presentation context, pynetdicom accepts the first of this
# list that it offers: lossless compressed first (no conversion, smaller), then uncompressed,
# and lossy last, so a sender is never asked to compress lossily what it could send intact.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """The preamble, ``DICM`` and File Meta Information of a received instance (PS3.10 7.1).

    What ``Event.encoded_dataset()`` puts before the data set, plus the Source Application
    Entity Title (0002,0016), encoded directly: building it as a pydicom dataset costs more
    than the rest of the receive path. Tests check it against pydicom's encoder.
    """
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
            _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
            _element(0x0012, b"UI", _IMPLEMENTATION_UID, b"\x00"),
            _element(0x0013, b"SH", _IMPLEMENTATION_VERSION, b" "),
            _element(0x0016, b"AE", source_ae.strip().encode("ascii", "replace"), b" "),
        )
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(elements))
    return b"".join((_PREAMBLE, group_length, elements))


_PREAMBLE = b"\x00" * 128 + b"DICM"
_IMPLEMENTATION_UID = PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")
_IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")


def handle_store(
    event: evt.Event, context: StoreContext, audit: AssociationAudit | None = None
) -> int | Dataset:
    """C-STORE: store the bytes durably, index them, then (only then) answer Success.

    With ``audit``, the outcome is noted for the association's audit message."""
    request = cast(C_STORE, event.request)
    transfer_syntax = str(event.context.transfer_syntax)
    source = event.assoc.requestor.ae_title
    try:
        meta = file_meta_bytes(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            transfer_syntax,
            source,
        )
        data = b"".join((meta, cast(BytesIO, request.DataSet).getbuffer()))
    except Exception as exc:  # an undecodable P-DATA stream: refuse it, keep serving
        log.warning("refused unreadable dataset: %s", type(exc).__name__)
        return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be read")
    outcome = store_instance(
        context,
        data,
        transfer_syntax=transfer_syntax,
        source=source,
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
        dataset_offset=len(meta),
    )
    if audit is not None:
        audit.stored(
            event.assoc,
            calling_ae=source,
            peer_address=event.assoc.requestor.address,
            study_instance_uid=outcome.study_instance_uid,
            sop_class_uid=outcome.sop_class_uid,
            ok=outcome.ok,
        )
    if outcome.status == STATUS_SUCCESS:
        return STATUS_SUCCESS
    return _status(outcome.status, outcome.comment)


def handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS


def handle_conn_close(event: evt.Event, audit: AssociationAudit) -> None:
    """The association ended: its studies' audit messages."""
    audit.closed(event.assoc)


def handle_rejected(event: evt.Event, audit: AssociationAudit) -> None:
    """An association request refused: a security alert."""
    request = event.assoc.requestor.primitive
    audit.refused(
        calling_ae=event.assoc.requestor.ae_title,
        called_ae=str(getattr(request, "called_ae_title", "") or "").strip(),
        peer_address=event.assoc.requestor.address,
    )


def handle_conn_open(event: evt.Event, poll_interval_s: float | None = None) -> None:
    """Nagle off on every accepted socket: small responses must not wait on delayed ACKs.

    The network timeout is set on the socket too: pynetdicom leaves accepted sockets
    blocking, so a peer that stops in the middle of a PDU would hold its association (and
    its threads) for ever. With the timeout, a read that waits longer closes the connection.

    ``poll_interval_s`` is the sleep of the association's DUL loop when it finds no event
    (pynetdicom's ``_run_loop_delay``, 1 ms by default). Each time the loop has read all the
    sender has sent so far it sleeps that long, several times per instance; the setting
    ``DICOM_POLL_INTERVAL_MS`` trades that latency against CPU (benchmarks/README.md).
    """
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        association_socket.socket.settimeout(event.assoc.network_timeout)
    if poll_interval_s is not None:
        set_poll_interval(event.assoc, poll_interval_s)


class ReusePortServer(ThreadedAssociationServer):
    """A threaded association server whose port several listener processes may share.

    Every accepted socket gets the network timeout, and the TLS handshake runs in the
    connection's own thread: pynetdicom does it in the listener thread on a blocking socket,
    where one peer that connects and stays silent stops every other connection.
    """

    audit: AssociationAudit | None = None  # a failed TLS handshake is a security alert

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT") and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        client_socket.settimeout(self.ae.network_timeout)
        return client_socket, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if self.ssl_context is not None and isinstance(request, socket.socket):
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except OSError as exc:  # ssl.SSLError, a timeout, a reset: this peer only
                log.warning("TLS handshake failed: %s", type(exc).__name__)
                if self.audit is not None:
                    association_refused(
                        self.audit.trail,
                        calling_ae="unknown",
                        peer_address=str(client_address[0]) if client_address else None,
                        description=f"TLS handshake failed ({type(exc).__name__})",
                    )
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert settings.tls_certificate is not None and settings.tls_private_key is not None
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates is not None:
        context.load_verify_locations(settings.tls_ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def make_ae(settings: Settings) -> AE:
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's standard handlers describe every PDU and DIMSE message at INFO and
        # DEBUG: with its logger above INFO they would only build messages nobody reads,
        # a measurable part of the receive path's time.
        quiet_standard_handlers()
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.require_called_aet = settings.require_called_ae
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class DicomService:
    """One listener: a pynetdicom AE serving on ``(host, port)`` in background threads."""

    def __init__(
        self, settings: Settings, context: StoreContext, audit: AssociationAudit | None = None
    ) -> None:
        self.settings = settings
        self.context = context
        self.audit = audit
        self.ae = make_ae(settings)
        self._server: ReusePortServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.context, self.audit]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_CONN_OPEN, handle_conn_open, [self.settings.dicom_poll_interval_ms / 1000]),
        ]
        if self.audit is not None:
            handlers.append((evt.EVT_CONN_CLOSE, handle_conn_close, [self.audit]))
            handlers.append((evt.EVT_REJECTED, handle_rejected, [self.audit]))
        server = self.ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            ssl_context=make_ssl_context(self.settings),
            evt_handlers=handlers,
            server_class=ReusePortServer,
        )
        assert isinstance(server, ReusePortServer)
        server.audit = self.audit
        # Registered with the AE as AE.start_server does, so AE.shutdown() stops it and aborts
        # its associations.
        register_server(self.ae, server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()
        host, port = server.server_address[:2]
        log.info(
            "DICOM service %s listening on %s:%d%s",
            self.settings.ae_title,
            host,
            port,
            " (TLS)" if self.settings.tls_enabled else "",
        )
        return str(host), int(port)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("service not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self.ae.shutdown()
        self._server = None
