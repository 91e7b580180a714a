"""The one durable ingest path, shared by C-STORE and STOW-RS.

Bytes as received → header read (never the pixels) → UIDs validated → file written and
fsynced → index rows committed → only then Success. Every failure leaves neither a partial
file nor an orphan row and maps to a DIMSE status the sender understands:

* ``0xA700`` out of resources: disk full or below its reserve (retry later);
* ``0xA900`` data set does not match SOP class: an image without Pixel Data (or without the
  attributes that size it);
* ``0xC210`` cannot understand: unreadable header, invalid UID, SOP class not accepted, Pixel
  Data shorter than declared or than the image needs (a truncated object);
* ``0xC001`` database unavailable (retry later).

The pixel check reads element and item headers only, never the pixel values.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import cast

from pydicom import Dataset, dcmread
from pydicom.dataset import FileDataset
from pydicom.filebase import ReadableBuffer
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.dicom.index import (
    InstanceHeader,
    KnownIds,
    RecordOutcome,
    header_from_dataset,
    record_instance,
)
from dicom_node.dicom.storage import (
    FileStore,
    InvalidUidError,
    PendingFile,
    StorageFullError,
    content_digest,
)

log = logging.getLogger(__name__)

IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
SR_SOP_CLASSES: frozenset[UID] = frozenset(
    (EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage)
)
STORAGE_SOP_CLASSES: tuple[UID, ...] = (*IMAGE_SOP_CLASSES, *sorted(SR_SOP_CLASSES))

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DATABASE_UNAVAILABLE = 0xC001

SrReceived = Callable[[Session, Dataset], object]
"""Called inside the indexing transaction when an SR arrives (ROI annotations)."""


@dataclass(frozen=True)
class StoreContext:
    """What the ingest path needs, passed in as data."""

    store: FileStore
    sessions: sessionmaker[Session]
    on_sr: SrReceived | None = None
    on_stored: Callable[[str], None] | None = None  # called with the study UID (metrics)
    known: KnownIds = field(default_factory=KnownIds)  # committed study/series ids
    writer_lock: AbstractContextManager[object] = field(default_factory=nullcontext)

    @property
    def engine(self) -> Engine:
        return cast(Engine, self.sessions.kw["bind"])

    now: Callable[[], datetime] = lambda: datetime.now(UTC)


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


def store_instance(
    context: StoreContext,
    data: bytes,
    *,
    transfer_syntax: str | None,
    source: str | None,
    expected_sop_instance_uid: str | None = None,
    dataset_offset: int | None = None,
) -> StoreOutcome:
    """Store one Part-10 object durably and index it; the status says what happened.

    ``transfer_syntax`` None: taken from the file meta (STOW-RS). ``source`` is the calling
    AE title or ``"STOW-RS"`` (kept in the index, never patient data). ``dataset_offset``:
    where the data set starts in ``data``, when the caller wrote the file meta itself and
    ``transfer_syntax`` is the one it names (C-STORE): the header is then read from there,
    without parsing the file meta again.

    The bytes go to a temporary file (written and fsynced in the background) while the header
    is read, checked and hashed; a refused instance leaves nothing behind.
    """
    try:
        pending: PendingFile | OSError = context.store.start(data)
    except OSError as exc:  # below the free-space reserve: answered once the header is read
        pending = exc
    header = _read_header(data, transfer_syntax, source, expected_sop_instance_uid, dataset_offset)
    if isinstance(header, StoreOutcome):
        if isinstance(pending, PendingFile):
            pending.discard()
        return header
    identity = {
        "sop_class_uid": header.sop_class_uid,
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
    }
    if isinstance(pending, OSError):
        return _storage_refusal(pending, source, identity)
    digest = content_digest(data)
    uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    try:
        stored = pending.place(context.store.relative_path(*uids, digest), digest)
    except OSError as exc:
        return _storage_refusal(exc, source, identity)

    try:
        with context.writer_lock, context.engine.begin() as connection:
            result = record_instance(
                connection,
                header,
                stored,
                calling_ae=source,
                now=context.now(),
                known=context.known,
            )
            if (
                context.on_sr is not None
                and header.sop_class_uid in SR_SOP_CLASSES
                and result.outcome is not RecordOutcome.IDENTICAL
            ):  # an ORM session in the same transaction, for the annotation it makes
                with Session(bind=connection) as session:
                    context.on_sr(session, dcmread(BytesIO(data)))
                    session.flush()
    except SQLAlchemyError as exc:
        pending.discard()  # no row can point at a file this call created
        log.error("database unavailable (%s): refused instance from %s", type(exc).__name__, source)
        return StoreOutcome(STATUS_DATABASE_UNAVAILABLE, "database unavailable", **identity)
    try:
        pending.wait_durable()  # the file's name, fsynced beside the commit
    except OSError as exc:  # the sender retries; the index then finds the same digest
        return _storage_refusal(exc, source, identity)

    context.known.remember(header, result)
    if result.previous_path is not None and result.previous_path != stored.relative_path:
        context.store.remove(result.previous_path)
    if context.on_stored is not None:
        context.on_stored(header.study_instance_uid)
    log.debug(
        "stored %s (%s) study=%s outcome=%s",
        header.sop_instance_uid,
        header.transfer_syntax_uid,
        header.study_instance_uid,
        result.outcome.value,
    )
    return StoreOutcome(STATUS_SUCCESS, **identity)


def _storage_refusal(exc: OSError, source: str | None, identity: dict[str, str]) -> StoreOutcome:
    """0xA700 for a disk that is full or failing: the sender retries later."""
    if isinstance(exc, StorageFullError):
        log.error("storage full: refused instance from %s (sender should retry)", source)
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, "storage full", **identity)
    log.error("storage write failed (%s): refused instance from %s", exc.strerror, source)
    return StoreOutcome(STATUS_OUT_OF_RESOURCES, "storage unavailable", **identity)


def _read_header(
    data: bytes,
    transfer_syntax: str | None,
    source: str | None,
    expected_sop_instance_uid: str | None,
    dataset_offset: int | None = None,
) -> InstanceHeader | StoreOutcome:
    """The index fields of ``data``, or the refusal when it cannot be stored.

    With ``dataset_offset`` (and ``transfer_syntax``) the data set is read from that offset
    in the encoding the transfer syntax names, past the file meta: pydicom's parse of the
    file meta costs as much as the rest of the header.
    """
    try:
        buffer = BytesIO(data)
        stream: BytesIO | None = buffer  # where the Pixel Data check reads
        if (
            dataset_offset is not None
            and transfer_syntax is not None
            and transfer_syntax != DeflatedExplicitVRLittleEndian
        ):
            syntax = transfer_syntax
            uid = UID(syntax)
            buffer.seek(dataset_offset)
            header_ds: Dataset = read_dataset(
                buffer, uid.is_implicit_VR, uid.is_little_endian, stop_when=_at_pixel_data
            )
            encoding: tuple[bool | None, bool | None] = (uid.is_implicit_VR, uid.is_little_endian)
        else:
            file_ds = dcmread(buffer, stop_before_pixels=True)
            syntax = transfer_syntax or str(file_ds.file_meta.TransferSyntaxUID)
            # its own buffer: a deflated data set is read from the inflated bytes
            header_ds, encoding, stream = file_ds, file_ds.original_encoding, None
        header = header_from_dataset(header_ds, syntax)
        if expected_sop_instance_uid and header.sop_instance_uid != expected_sop_instance_uid:
            raise InvalidUidError("SOPInstanceUID differs from the request's")
        if header.sop_class_uid not in STORAGE_SOP_CLASSES:
            return StoreOutcome(
                STATUS_CANNOT_UNDERSTAND,
                "SOP class not accepted",
                sop_class_uid=header.sop_class_uid,
                sop_instance_uid=header.sop_instance_uid,
            )
        if header.sop_class_uid in IMAGE_SOP_CLASSES:
            problem = pixel_data_problem(header_ds, syntax, stream, encoding)
            if problem is not None:
                status, comment = problem
                log.warning("refused instance from %s: %s", source, comment)
                return StoreOutcome(
                    status,
                    comment,
                    sop_class_uid=header.sop_class_uid,
                    sop_instance_uid=header.sop_instance_uid,
                )
    except InvalidUidError as exc:
        log.warning("refused instance from %s: %s", source, exc)
        return StoreOutcome(STATUS_CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # an unreadable dataset: refuse it, keep serving
        log.warning("refused unreadable dataset from %s: %s", source, type(exc).__name__)
        return StoreOutcome(STATUS_CANNOT_UNDERSTAND, "dataset cannot be read")
    return header


# --- the pixel data check (element and item headers only) -----------------------------------

_PIXEL_DATA_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))  # Pixel, Float, Double Float
_LONG_LENGTH_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_DATA_TAGS


def pixel_data_problem(
    header_ds: Dataset,
    transfer_syntax: str,
    stream: ReadableBuffer | None = None,
    encoding: tuple[bool | None, bool | None] | None = None,
) -> tuple[int, str] | None:
    """Why an image's Pixel Data cannot be whole, as (status, comment); None when it can.

    ``header_ds`` was read up to its Pixel Data from ``stream`` (by default its buffer, from
    ``dcmread(..., stop_before_pixels=True)``), which is left at the element it stopped
    before (at the end when there is no Pixel Data); ``encoding`` (implicit VR, little
    endian) defaults to the dataset's. Only element and item headers are read: the declared
    length must lie within the bytes received and cover what Rows × Columns × Samples × Bits
    Allocated × Frames need; encapsulated fragments must each lie within the bytes and end
    with their delimiter.
    """
    if stream is None:
        stream = header_ds.buffer if isinstance(header_ds, FileDataset) else None
    if stream is None:
        return None  # read from a path: nothing to check against here
    start = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(start)
    is_implicit, is_little = encoding or header_ds.original_encoding
    order = "<" if is_little is not False else ">"
    head = stream.read(8)
    if not head:
        return STATUS_DOES_NOT_MATCH_SOP_CLASS, "image without Pixel Data"
    if len(head) < 8:
        return STATUS_CANNOT_UNDERSTAND, "dataset truncated in the Pixel Data element"
    group, element = struct.unpack(order + "HH", head[:4])
    if (group << 16 | element) not in _PIXEL_DATA_TAGS:
        return STATUS_CANNOT_UNDERSTAND, "dataset structure cannot be read"
    if is_implicit:
        (length,) = struct.unpack(order + "L", head[4:8])
        value_start = start + 8
    elif head[4:6] in _LONG_LENGTH_VRS:
        extra = stream.read(4)
        if len(extra) < 4:
            return STATUS_CANNOT_UNDERSTAND, "dataset truncated in the Pixel Data element"
        (length,) = struct.unpack(order + "L", extra)
        value_start = start + 12
    else:
        (length,) = struct.unpack(order + "H", head[6:8])
        value_start = start + 8
    encapsulated = UID(transfer_syntax).is_encapsulated
    if length == _UNDEFINED_LENGTH:
        if not encapsulated:
            return STATUS_CANNOT_UNDERSTAND, "native Pixel Data of undefined length"
        return _fragments_problem(stream, value_start, end)
    if value_start + length > end:
        return STATUS_CANNOT_UNDERSTAND, "Pixel Data shorter than its declared length"
    if encapsulated:
        return STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data of defined length"
    needed = _native_pixel_bytes(header_ds)
    if needed is None:
        return STATUS_DOES_NOT_MATCH_SOP_CLASS, "image pixel description missing or invalid"
    if length < needed:
        return STATUS_CANNOT_UNDERSTAND, "Pixel Data shorter than the image size needs"
    return None


def _native_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes that uncompressed pixel data of ``ds`` needs; None when it cannot be told."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if min(rows, columns, samples, frames) < 1 or bits < 1 or (bits != 1 and bits % 8):
        return None
    values = rows * columns * samples * frames
    return (values + 7) // 8 if bits == 1 else values * (bits // 8)


def _fragments_problem(stream: ReadableBuffer, position: int, end: int) -> tuple[int, str] | None:
    """Walk the items of encapsulated Pixel Data (always little endian) to its delimiter."""
    items = 0
    while True:
        stream.seek(position)
        head = stream.read(8)
        if len(head) < 8:
            return STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data truncated"
        group, element, length = struct.unpack("<HHL", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            return STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data items cannot be read"
        position += 8 + length
        if position > end:
            return STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data truncated"
        items += 1
    if items < 2:  # the Basic Offset Table item, then at least one fragment
        return STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data without a fragment"
    return None
