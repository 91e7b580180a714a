"""The node process: DICOM listener(s) and the scheduler over one database and storage.

``listener_processes > 1`` starts extra listener processes sharing the port
(``SO_REUSEPORT``): one Python process is bound by one core, so concurrent senders scale
with processes. The scheduler runs in the main process only.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive import lifecycle
from dicom_node.archive.db import make_engine, make_session_factory, writer_lock
from dicom_node.archive.migrate import require_current_schema
from dicom_node.archive.schema import Instance, RoiAnnotation, TriageResult
from dicom_node.audit import AuditTrail
from dicom_node.audit.dicom import AssociationAudit
from dicom_node.broker.wake import SendTask
from dicom_node.dicom.ingest import SrReceived, StoreContext
from dicom_node.dicom.scp import DicomService
from dicom_node.dicom.sr_roi import RoiSrError, extract_roi, is_roi_report
from dicom_node.dicom.storage import FileStore
from dicom_node.scheduler import Scheduler
from dicom_node.settings import Settings
from dicom_node.web.metrics import count_instance_received

log = logging.getLogger(__name__)


def make_store(settings: Settings) -> FileStore:
    return FileStore(
        settings.resolved_storage_dir, min_free_bytes=settings.min_free_disk_mb * 1024 * 1024
    )


def _sr_hook(store: FileStore) -> SrReceived:
    """Turns a received ROI report (TID 1500 SR) into a pending annotation."""
    return functools.partial(annotation_from_sr, storage_root=store.root)


def annotation_from_sr(session: Session, ds: Dataset, *, storage_root: Path) -> int | None:
    """Turn a received TID 1500 ROI report into a pending annotation, if it is one.

    Called by the C-STORE handler inside the indexing transaction. An SR that is not an ROI
    report (or is malformed) is stored like any instance and only logged: the sender did
    nothing wrong by sending it.
    """
    if not is_roi_report(ds):
        return None

    def resolve_image(sop_instance_uid: str) -> Dataset | None:
        path = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
        if path is None:
            path = review_image_path(session, str(ds.StudyInstanceUID), sop_instance_uid)
        if path is None:
            return None
        return dcmread(storage_root / path, stop_before_pixels=True)

    try:
        report = extract_roi(ds, resolve_image)
    except RoiSrError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("SR %s holds no usable ROI: %s", ds.get("SOPInstanceUID", "?"), reason)
        return None
    stored = lifecycle.create_annotation(
        session,
        report.roi,
        source="sr",
        source_key=f"sr:{report.sr_sop_instance_uid}",
        annotator=report.annotator,
        now=datetime.now(UTC),
    )
    return stored.id


def review_image_path(session: Session, study_uid: str, sop_instance_uid: str) -> str | None:
    """Where a review image the node wrote for ``study_uid`` lies (relative to the storage
    root), by SOP Instance UID. The node's own images are not indexed as received instances,
    but a reader draws an ROI on them in the viewer and the SR that comes back names them."""
    rows = session.scalars(
        select(TriageResult.review_paths)
        .join(RoiAnnotation, RoiAnnotation.id == TriageResult.annotation_id)
        .where(
            RoiAnnotation.study_instance_uid == study_uid, TriageResult.review_paths.is_not(None)
        )
    )
    for paths in rows:
        for path in paths or []:
            name = path.rsplit("/", 1)[-1].removesuffix(".dcm")
            if name.rsplit(".", 1)[0] == sop_instance_uid:  # {SOP UID}.{digest}.dcm
                return str(path)
    return None


@dataclass
class Node:
    """A running node; :meth:`stop` shuts everything down."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: FileStore
    service: DicomService
    scheduler: Scheduler | None
    children: list[Any] = field(default_factory=list)
    audit: AuditTrail | None = None

    @property
    def dicom_address(self) -> tuple[str, int]:
        return self.service.address

    def stop(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.join(timeout=10)
        if self.scheduler is not None:
            self.scheduler.stop()
        self.service.stop()
        audit, self.audit = self.audit, None  # a second stop reports nothing again
        if audit is not None:
            audit.application_stopped(self.settings.ae_title)
            audit.close()
        self.engine.dispose()


def _association_audit(settings: Settings, trail: AuditTrail) -> AssociationAudit:
    return AssociationAudit(
        trail, ae_title=settings.ae_title, allowed_calling_aes=settings.allowed_calling_aes
    )


def start_node(settings: Settings, *, send: SendTask | None, run_scheduler: bool = True) -> Node:
    """Start the listener(s) and, with ``send``, the scheduler. Returns at once."""
    engine = make_engine(settings.resolved_database_url)
    require_current_schema(engine)
    sessions = make_session_factory(engine)
    store = make_store(settings)
    store.sweep_incoming()
    audit = AuditTrail.from_settings(
        settings, sessions, source_id=settings.ae_title, writer_lock=writer_lock(engine)
    )
    service = DicomService(
        settings,
        StoreContext(
            store=store,
            sessions=sessions,
            on_sr=_sr_hook(store),
            on_stored=count_instance_received,
            writer_lock=writer_lock(engine),
        ),
        audit=_association_audit(settings, audit),
    )
    service.start()
    audit.application_started(settings.ae_title)
    children = []
    if settings.listener_processes > 1:
        if settings.dicom_port == 0:
            raise ValueError("several listener processes need a fixed DICOM port")
        ctx = multiprocessing.get_context("spawn")
        for number in range(1, settings.listener_processes):
            child = ctx.Process(
                target=_listener_main,
                args=(settings.model_dump(),),
                name=f"dicom-listener-{number}",
                daemon=True,
            )
            child.start()
            children.append(child)
    scheduler = None
    if run_scheduler and send is not None:
        scheduler = Scheduler(settings, sessions, send)
        scheduler.start()
    return Node(settings, engine, sessions, store, service, scheduler, children, audit)


def _listener_main(settings_data: dict[str, Any]) -> None:
    """Entry point of an extra listener process (no scheduler)."""
    settings = Settings(**settings_data)
    logging.basicConfig(level=logging.INFO)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    store = make_store(settings)
    audit = AuditTrail.from_settings(
        settings, sessions, source_id=settings.ae_title, writer_lock=writer_lock(engine)
    )
    service = DicomService(
        settings,
        StoreContext(
            store=store,
            sessions=sessions,
            on_sr=_sr_hook(store),
            on_stored=count_instance_received,
            writer_lock=writer_lock(engine),
        ),
        audit=_association_audit(settings, audit),
    )
    service.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    service.stop()
    audit.close()
    engine.dispose()
