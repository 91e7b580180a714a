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
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory, writer_lock
from dicom_node.archive.migrate import require_current_schema
from dicom_node.broker.wake import SendTask
from dicom_node.dicom.ingest import SrReceived, StoreContext
from dicom_node.dicom.scp import DicomService
from dicom_node.dicom.sr_roi import annotation_from_sr
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
    return functools.partial(_annotation_from_sr, storage_root=store.root)


def _annotation_from_sr(session: Session, ds: Dataset, *, storage_root: Path) -> None:
    annotation_from_sr(session, ds, storage_root)


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
        self.engine.dispose()


def start_node(settings: Settings, *, send: SendTask | None, run_scheduler: bool = True) -> Node:
    """Start the listener(s) and, with ``send``, the scheduler. Returns at once."""
    engine = make_engine(settings.resolved_database_url)
    require_current_schema(engine)
    sessions = make_session_factory(engine)
    store = make_store(settings)
    store.sweep_incoming()
    service = DicomService(
        settings,
        StoreContext(
            store=store,
            sessions=sessions,
            on_sr=_sr_hook(store),
            on_stored=count_instance_received,
            writer_lock=writer_lock(engine),
        ),
    )
    service.start()
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
    return Node(settings, engine, sessions, store, service, scheduler, children)


def _listener_main(settings_data: dict[str, Any]) -> None:
    """Entry point of an extra listener process (no scheduler)."""
    settings = Settings(**settings_data)
    logging.basicConfig(level=logging.INFO)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    store = make_store(settings)
    service = DicomService(
        settings,
        StoreContext(
            store=store,
            sessions=sessions,
            on_sr=_sr_hook(store),
            on_stored=count_instance_received,
            writer_lock=writer_lock(engine),
        ),
    )
    service.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    service.stop()
    engine.dispose()
