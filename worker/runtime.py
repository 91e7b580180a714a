"""What one worker process holds: settings, one database engine, the store, the model.

Made by :func:`get_runtime` on first use in a process (never at import) and dropped by
:func:`reset_runtime` in Celery's ``worker_process_init`` so a forked child never shares its
parent's database connections. The model is loaded once per process, not per job.

The site names its checkpoints by path and pins each by the sha256 it must carry
(``MODEL_CHECKPOINT_SHA256``; ``CANDIDATE_CHECKPOINT`` and ``CANDIDATE_CHECKPOINT_SHA256``
for shadow mode): :func:`load_classifier` refuses one whose sha256 differs, and
:func:`verify_checkpoints` checks them all before a worker takes any job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory, writer_lock
from dicom_node.audit import AuditTrail
from dicom_node.broker.app import TaskSender, make_celery
from dicom_node.broker.wake import SendTask
from dicom_node.dicom.storage import FileStore
from dicom_node.node import make_store
from dicom_node.settings import Settings, load_settings
from model.serving.checkpoint import load_checkpoint
from model.serving.inference import Classifier
from model.synthetic.demo import demo_checkpoint_path, ensure_demo_checkpoint
from worker.destinations import Destination
from worker.destinations.factory import make_destination
from worker.errors import TransientError

log = logging.getLogger(__name__)

LIVE: Final = "live"
SHADOW: Final = "shadow"
Role = Literal["live", "shadow"]
_PIN_SETTING = {LIVE: "MODEL_CHECKPOINT_SHA256", SHADOW: "CANDIDATE_CHECKPOINT_SHA256"}


class CheckpointRefused(TransientError):
    """A configured checkpoint is not the one the site pinned, or cannot serve beside the
    live one (a candidate of the live model's version). Transient: jobs wait for the
    configuration to be put right (and fail, with this reason, after their attempts)."""


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies a configured checkpoint: its name, version and sha256."""

    role: Role
    path: Path
    name: str
    version: str
    sha256: str
    pinned_sha256: str | None
    demonstration: bool


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


def checkpoint_of(settings: Settings, role: Role, *, train_if_missing: bool = True) -> Path | None:
    """The checkpoint file the site configured for ``role`` (None: no candidate)."""
    if role == LIVE:
        return default_checkpoint(settings, train_if_missing=train_if_missing)
    return settings.candidate_checkpoint


def pinned_sha256(settings: Settings, role: Role) -> str | None:
    return (
        settings.model_checkpoint_sha256 if role == LIVE else settings.candidate_checkpoint_sha256
    )


def check_pin(role: Role, path: Path, sha256: str, pinned: str | None) -> None:
    """:class:`CheckpointRefused` when a pin is set and the checkpoint's sha256 differs."""
    if pinned is not None and sha256 != pinned:
        raise CheckpointRefused(
            f"{role} checkpoint {path}: its sha256 is {sha256}, not the configured "
            f"{_PIN_SETTING[role]} {pinned}; refusing to serve it"
        )


def check_candidate(
    live: ModelIdentity | Classifier, candidate: ModelIdentity | Classifier
) -> None:
    """A candidate must be another model: its results are keyed by its version."""
    if candidate.version == live.version:
        raise CheckpointRefused(
            f"candidate checkpoint has the live model's version {live.version!r} "
            f"({candidate.name}): shadow results are recorded by version, give it another"
        )


def load_classifier(settings: Settings, role: Role) -> Classifier | None:
    """The classifier of the checkpoint configured for ``role`` (loaded once per process),
    checked against its pin; None when no candidate is configured."""
    path = checkpoint_of(settings, role)
    if path is None:
        return None
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = None if settings.inference_device == "auto" else settings.inference_device
    classifier = Classifier.shared(path, device=device, threshold=settings.threshold)
    check_pin(role, path, classifier.sha256, pinned_sha256(settings, role))
    return classifier


def identify_checkpoint(settings: Settings, role: Role) -> ModelIdentity | None:
    """Name, version and sha256 of the checkpoint configured for ``role`` (the file is read
    and verified, no network built); None when no candidate is configured."""
    path = checkpoint_of(settings, role, train_if_missing=False)
    if path is None:
        return None
    _, meta = load_checkpoint(path)
    return ModelIdentity(
        role=role,
        path=path,
        name=str(meta["name"]),
        version=str(meta["version"]),
        sha256=str(meta["sha256"]),
        pinned_sha256=pinned_sha256(settings, role),
        demonstration=bool(meta.get("demonstration", False)),
    )


def verify_checkpoints(settings: Settings) -> list[ModelIdentity]:
    """Every configured checkpoint read, verified and checked against its pin (and the
    candidate against the live model) — what a worker does before it takes a job.
    :class:`CheckpointRefused` or :class:`~model.serving.checkpoint.CheckpointError`."""
    identities = [
        identity
        for role in (LIVE, SHADOW)
        if (identity := identify_checkpoint(settings, role)) is not None
    ]
    for identity in identities:
        check_pin(identity.role, identity.path, identity.sha256, identity.pinned_sha256)
    if len(identities) == 2:
        check_candidate(identities[0], identities[1])
    return identities


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: FileStore
    send: SendTask | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _classifier: Classifier | None = None
    _candidate: Classifier | None = None
    _destinations: dict[str, Destination] | None = None
    _audit: AuditTrail | None = None
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
                self._classifier = load_classifier(self.settings, LIVE)
            assert self._classifier is not None
            return self._classifier

    @property
    def candidate(self) -> Classifier | None:
        """Shadow mode's candidate (None when none is configured); refused when it has the
        live model's version or differs from its pin (:class:`CheckpointRefused`)."""
        if self.settings.candidate_checkpoint is None:
            return None
        live = self.classifier
        with self._lock:
            if self._candidate is None:
                candidate = load_classifier(self.settings, SHADOW)
                assert candidate is not None
                check_candidate(live, candidate)
                self._candidate = candidate
            return self._candidate

    @property
    def destinations(self) -> dict[str, Destination]:
        with self._lock:
            if self._destinations is None:
                self._destinations = {
                    config.name: make_destination(config, node_ae_title=self.settings.ae_title)
                    for config in self.settings.destinations
                }
            return self._destinations

    @property
    def audit(self) -> AuditTrail:
        """This worker's audit trail (its audit source is the worker id)."""
        with self._lock:
            if self._audit is None:
                self._audit = AuditTrail.from_settings(
                    self.settings,
                    self.sessions,
                    source_id=self.worker_id,
                    writer_lock=writer_lock(self.engine),
                )
            return self._audit

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
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
