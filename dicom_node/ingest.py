"""The one durable ingest path, shared by C-STORE and STOW-RS.

Bytes as received → header read (never the pixels) → UIDs validated → file written and
fsynced → index rows committed → only then Success. Every failure leaves neither a partial
file nor an orphan row and maps to a DIMSE status the sender understands:

* ``0xA700`` out of resources: disk full or below its reserve (retry later);
* ``0xC210`` cannot understand: unreadable header, invalid UID, SOP class not accepted;
* ``0xC001`` database unavailable (retry later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index import RecordOutcome, header_from_dataset, record_instance
from dicom_node.storage import FileStore, InvalidUidError, StorageFullError

log = logging.getLogger(__name__)

IMAGE_SOP_CLASSES: tuple[UID, ...] = (CTImageStorage, EnhancedCTImageStorage)
SR_SOP_CLASSES: frozenset[UID] = frozenset(
    (EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage)
)
STORAGE_SOP_CLASSES: tuple[UID, ...] = (*IMAGE_SOP_CLASSES, *sorted(SR_SOP_CLASSES))

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DATABASE_UNAVAILABLE = 0xC001

SrReceived = Callable[[Session, Dataset], None]
"""Called inside the indexing transaction when an SR arrives (ROI annotations)."""


@dataclass(frozen=True)
class StoreContext:
    """What the ingest path needs, passed in as data."""

    store: FileStore
    sessions: sessionmaker[Session]
    on_sr: SrReceived | None = None
    on_stored: Callable[[str], None] | None = None  # called with the study UID (metrics)
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
) -> StoreOutcome:
    """Store one Part-10 object durably and index it; the status says what happened.

    ``transfer_syntax`` None: taken from the file meta (STOW-RS). ``source`` is the calling
    AE title or ``"STOW-RS"`` (kept in the index, never patient data).
    """
    try:
        header_ds = dcmread(BytesIO(data), stop_before_pixels=True)
        syntax = transfer_syntax or str(header_ds.file_meta.TransferSyntaxUID)
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
    except InvalidUidError as exc:
        log.warning("refused instance from %s: %s", source, exc)
        return StoreOutcome(STATUS_CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # an unreadable dataset: refuse it, keep serving
        log.warning("refused unreadable dataset from %s: %s", source, type(exc).__name__)
        return StoreOutcome(STATUS_CANNOT_UNDERSTAND, "dataset cannot be read")

    identity = {
        "sop_class_uid": header.sop_class_uid,
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
    }
    try:
        stored = context.store.write(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data
        )
    except StorageFullError:
        log.error("storage full: refused instance from %s (sender should retry)", source)
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, "storage full", **identity)
    except OSError as exc:
        log.error("storage write failed (%s): refused instance from %s", exc.strerror, source)
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, "storage unavailable", **identity)

    try:
        with context.sessions() as session, session.begin():
            result = record_instance(session, header, stored, calling_ae=source, now=context.now())
            if (
                context.on_sr is not None
                and header.sop_class_uid in SR_SOP_CLASSES
                and result.outcome is not RecordOutcome.IDENTICAL
            ):
                context.on_sr(session, dcmread(BytesIO(data)))
    except SQLAlchemyError as exc:
        if stored.created:  # no row can point at a file this call created
            context.store.remove(stored.relative_path)
        log.error("database unavailable (%s): refused instance from %s", type(exc).__name__, source)
        return StoreOutcome(STATUS_DATABASE_UNAVAILABLE, "database unavailable", **identity)

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
