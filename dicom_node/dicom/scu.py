"""C-STORE SCU: send DICOM Part-10 files to a peer (a PACS) over one association.

Failures are reported as :class:`StoreError` with ``transient`` telling the caller whether a
later attempt may succeed:

- no association (peer down, connection refused or timed out, TLS handshake failed, the peer
  rejected or aborted the association) and a lost or timed-out response: transient;
- status 0xA7xx (out of resources), 0x0110 (processing failure), 0xFE00 (cancel): transient;
- any other failure status (0xA9xx data set does not match the SOP class, 0xCxxx cannot
  understand, 0x0122 SOP class not supported, 0x0124 not authorised...) and a peer that
  accepts none of the proposed presentation contexts: permanent.

Warning statuses (0x0001, 0xB000, 0xB006, 0xB007) count as success; they are kept in the
returned :class:`StoreOutcome` and logged.

pynetdicom never turns Nagle's algorithm off; small C-STORE requests and responses then wait
on delayed ACKs (about 3× slower on loopback, see PERFORMANCE.md), so the SCU sets
``TCP_NODELAY`` on its socket as soon as the connection is open.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

logger = logging.getLogger(__name__)

MAX_PRESENTATION_CONTEXTS = 128

StatusKind = Literal["success", "warning", "transient", "permanent"]


class StoreError(Exception):
    """A C-STORE that did not succeed; ``transient`` says whether retrying may help."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        sop_instance_uid: str = "",
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class StorePeer:
    """Where to send: the peer's AE title and address, and how to reach it."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    timeout_s: float = 30.0

    def describe(self) -> str:
        tls = " (TLS)" if self.ssl_context is not None else ""
        return f"{self.ae_title}@{self.host}:{self.port}{tls}"


@dataclass(frozen=True)
class StoreOutcome:
    """The accepted C-STORE of one file: status 0x0000 or a warning status."""

    path: Path
    sop_instance_uid: str
    status: int
    error_comment: str = ""

    @property
    def warning(self) -> bool:
        return self.status != 0x0000


@dataclass(frozen=True)
class _FileHeader:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def status_kind(status: int) -> StatusKind:
    """What a DIMSE C-STORE (or STOW-RS failure reason) status means for a sender."""
    if status == 0x0000:
        return "success"
    if 0xA700 <= status <= 0xA7FF or status in (0x0110, 0xFE00):
        return "transient"
    if code_to_category(status) == "Warning" or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "permanent"


def make_client_ssl_context(
    *,
    ca_certificates: Path | None = None,
    certificate: Path | None = None,
    private_key: Path | None = None,
) -> ssl.SSLContext:
    """TLS context of a DICOM TLS client: verifies the peer (against ``ca_certificates`` or
    the system's CAs) and presents ``certificate`` when the peer asks for one."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(ca_certificates) if ca_certificates is not None else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if (certificate is None) != (private_key is None):
        raise ValueError("a client certificate needs its private key (and the other way round)")
    if certificate is not None and private_key is not None:
        context.load_cert_chain(certificate, private_key)
    return context


def store_files(paths: Sequence[Path], peer: StorePeer) -> list[StoreOutcome]:
    """Send the Part-10 files ``paths`` to ``peer`` over one association, in order.

    Returns one outcome per file when every file was accepted (success or warning); raises
    :class:`StoreError` at the first file that was not (the files before it were stored).
    """
    if not paths:
        return []
    headers = [_read_header(Path(path)) for path in paths]
    ae = _make_ae(peer, headers)
    record = _AssociationRecord()
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=(peer.ssl_context, peer.host) if peer.ssl_context is not None else None,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, _disable_nagle),
            (evt.EVT_ACSE_RECV, record.on_acse_receive),
        ],
    )
    if not assoc.is_established:
        raise _association_failure(assoc, peer, record)
    outcomes: list[StoreOutcome] = []
    try:
        for header in headers:
            outcomes.append(_store_one(assoc, header, peer))
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    logger.info(
        "C-STORE of %d instance(s) to %s accepted (%d with a warning)",
        len(outcomes),
        peer.describe(),
        sum(outcome.warning for outcome in outcomes),
    )
    return outcomes


def store_file(path: Path, peer: StorePeer) -> StoreOutcome:
    """Send one Part-10 file to ``peer``; see :func:`store_files`."""
    return store_files([path], peer)[0]


# --- internals ------------------------------------------------------------------------------


class _AssociationRecord:
    """What the peer answered to the association request (pynetdicom keeps it to itself)."""

    def __init__(self) -> None:
        self.accepted = False
        self.rejection: str | None = None

    def on_acse_receive(self, event: evt.Event) -> None:
        primitive: Any = vars(event).get("primitive")  # set for EVT_ACSE_RECV
        result = getattr(primitive, "result", None)
        if result == 0x00:
            self.accepted = True
        elif result in (0x01, 0x02):
            self.rejection = (
                f"{primitive.result_str}, source: {primitive.source_str}, "
                f"reason: {primitive.reason_str}"
            )


def _disable_nagle(event: evt.Event) -> None:
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_header(path: Path) -> _FileHeader:
    try:
        meta = read_file_meta_info(path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}", transient=False) from exc
    except (InvalidDicomError, ValueError, KeyError, EOFError) as exc:
        raise StoreError(f"{path} is not a DICOM Part-10 file: {exc}", transient=False) from exc
    try:
        return _FileHeader(
            path=path,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
        )
    except AttributeError as exc:
        raise StoreError(
            f"{path} lacks file meta information needed to send it: {exc}", transient=False
        ) from exc


def _make_ae(peer: StorePeer, headers: Sequence[_FileHeader]) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.connection_timeout = peer.timeout_s
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    wanted = sorted({(h.sop_class_uid, h.transfer_syntax_uid) for h in headers})
    if len(wanted) > MAX_PRESENTATION_CONTEXTS:
        raise StoreError(
            f"{len(wanted)} SOP class/transfer syntax pairs exceed the "
            f"{MAX_PRESENTATION_CONTEXTS} presentation contexts of one association",
            transient=False,
        )
    ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in wanted]
    return ae


def _association_failure(
    assoc: Association, peer: StorePeer, record: _AssociationRecord
) -> StoreError:
    if record.rejection is not None:
        message = f"{peer.describe()} rejected the association ({record.rejection})"
        logger.warning("C-STORE: %s", message)
        return StoreError(message, transient=True)
    if record.accepted:
        message = (
            f"{peer.describe()} accepted none of the proposed presentation contexts "
            "(it does not store this SOP class / transfer syntax)"
        )
        logger.warning("C-STORE: %s", message)
        return StoreError(message, transient=False)
    state = "aborted" if assoc.is_aborted else "not reachable (refused, timed out or TLS failed)"
    message = f"no association with {peer.describe()}: {state}"
    logger.warning("C-STORE: %s", message)
    return StoreError(message, transient=True)


def _store_one(assoc: Association, header: _FileHeader, peer: StorePeer) -> StoreOutcome:
    uid = header.sop_instance_uid
    try:
        answer = assoc.send_c_store(header.path)
    except ValueError as exc:  # no accepted presentation context for this file
        raise StoreError(
            f"{peer.describe()} does not accept {header.sop_class_uid} in "
            f"{header.transfer_syntax_uid}: {exc}",
            transient=False,
            sop_instance_uid=uid,
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise StoreError(
            f"C-STORE to {peer.describe()} interrupted: {exc}", transient=True, sop_instance_uid=uid
        ) from exc
    if "Status" not in answer:
        raise StoreError(
            f"no valid C-STORE response from {peer.describe()} (timeout or abort)",
            transient=True,
            sop_instance_uid=uid,
        )
    status = int(answer.Status)
    comment = str(answer.get("ErrorComment", "") or "")
    kind = status_kind(status)
    if kind in ("success", "warning"):
        if kind == "warning":
            logger.warning(
                "C-STORE of %s to %s accepted with warning 0x%04X %s",
                uid,
                peer.describe(),
                status,
                comment,
            )
        return StoreOutcome(header.path, uid, status, comment)
    detail = f" ({comment})" if comment else ""
    raise StoreError(
        f"{peer.describe()} answered C-STORE of {uid} with 0x{status:04X}{detail}",
        transient=kind == "transient",
        status=status,
        sop_instance_uid=uid,
    )
