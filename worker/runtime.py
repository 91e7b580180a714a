"""What one worker process holds: settings, one database engine, the store, the model.

Made by :func:`get_runtime` on first use in a process (never at import) and dropped by
:func:`reset_runtime` in Celery's ``worker_process_init`` so a forked child never shares its
parent's database connections. The model is loaded once per process, not per job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.broker.app import TaskSender, make_celery
from dicom_node.broker.wake import SendTask
from dicom_node.dicom.storage import FileStore
from dicom_node.node import make_store
from dicom_node.settings import Settings, load_settings
from model.serving.inference import Classifier
from model.synthetic.demo import demo_checkpoint_path, ensure_demo_checkpoint
from worker.destinations import Destination
from worker.destinations.factory import make_destination

if TYPE_CHECKING:
    from model.serving.inference import Classifier

log = logging.getLogger(__name__)


def default_checkpoint(
    settings: Settings, *, train_if_missing: bool = True, progress: bool = False
) -> Path:
    """The configured checkpoint, or the demonstration model (trained once, then cached;
    ``progress`` shows progress bars for that first training)."""
    if settings.model_checkpoint is not None:
        return settings.model_checkpoint

    cache = (settings.var_dir / "models").resolve()
    if not train_if_missing:
        return demo_checkpoint_path(cache)
    return ensure_demo_checkpoint(cache, progress=progress)


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: FileStore
    send: SendTask | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _classifier: Classifier | None = None
    _destinations: dict[str, Destination] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings, *, send: SendTask | None = None) -> WorkerRuntime:
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=make_store(settings),
            send=send,
        )

    @property
    def classifier(self) -> Classifier:
        with self._lock:
            if self._classifier is None:
                import torch

                if self.settings.torch_threads:
                    torch.set_num_threads(self.settings.torch_threads)
                device = (
                    None
                    if self.settings.inference_device == "auto"
                    else (self.settings.inference_device)
                )
                self._classifier = Classifier.shared(
                    default_checkpoint(self.settings),
                    device=device,
                    threshold=self.settings.threshold,
                )
            return self._classifier

    @property
    def destinations(self) -> dict[str, Destination]:
        with self._lock:
            if self._destinations is None:
                self._destinations = {
                    config.name: make_destination(config, node_ae_title=self.settings.ae_title)
                    for config in self.settings.destinations
                }
            return self._destinations

    def close(self) -> None:
        self.engine.dispose()


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, made from the environment's settings on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            settings = load_settings()
            _runtime = WorkerRuntime.from_settings(
                settings, send=TaskSender(make_celery(settings, "spine_triage_worker_sender"))
            )
        return _runtime


def set_runtime(runtime: WorkerRuntime | None) -> None:
    """Install a runtime (tests, the embedded command) or drop the current one."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None and runtime is not _runtime:
            _runtime.close()
        _runtime = runtime


def reset_runtime() -> None:
    """Forget the runtime without closing it (a forked child must not touch its parent's
    connections; it makes its own on first use)."""
    global _runtime
    with _runtime_lock:
        _runtime = None
