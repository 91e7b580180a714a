"""The file store: received instances, byte for byte, durable before they are acknowledged.

Layout: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<digest>.dcm``. The
content digest in the name means a re-sent instance with other content never overwrites the
file the index points to: the new file is written beside it, the index switches to it in one
transaction, and only then is the old file removed.

Every write is a temporary file in ``ROOT/.incoming``, fsynced, renamed into place, and the
folder fsynced; a crash leaves at most a temporary file, which :meth:`FileStore.sweep_incoming`
removes at start-up. UIDs are validated before they become path components. The receive path
writes and fsyncs in the background while it reads the header and indexes
(:meth:`FileStore.start`, :class:`PendingFile`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
INCOMING = ".incoming"
DIGEST_CHARS = 16


class InvalidUidError(ValueError):
    """A value that is not a valid DICOM UID (and so must never become a path)."""


class StorageFullError(OSError):
    """Not enough free space to store an instance."""


def validate_uid(value: object, name: str = "UID") -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUidError`.

    A DICOM UID is at most 64 characters of digit groups separated by dots, with no leading
    zero in a group: nothing of it can traverse or escape a folder.
    """
    if not isinstance(value, str):
        raise InvalidUidError(f"{name} is missing or not a string")
    text = value.strip("\x00 ")
    if not text or len(text) > 64 or not _UID_PATTERN.match(text):
        raise InvalidUidError(f"{name} is not a valid DICOM UID")
    return text


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str
    created: bool  # False when identical content was already stored there


class FileStore:
    """Durable, content-addressed storage of DICOM files under one root folder."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self._incoming = self.root / INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._folders: set[str] = set()  # series folders known to exist (durably)

    # --- paths ---------------------------------------------------------------------------
    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> str:
        parts = (
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            f"{validate_uid(sop_uid, 'SOPInstanceUID')}.{digest[:DIGEST_CHARS]}.dcm",
        )
        return "/".join(parts)

    def absolute(self, relative_path: str) -> Path:
        """The absolute path of a stored file; refuses anything outside the root."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidUidError("path escapes the storage root")
        return path

    # --- writing -------------------------------------------------------------------------
    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise StorageFullError(errno.ENOSPC, "storage below its free-space reserve")

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Write ``data`` durably and return where it lies (relative to the root).

        Raises :class:`InvalidUidError` for a bad UID (nothing written) and
        :class:`StorageFullError` / :class:`OSError` when the disk refuses (nothing left).
        """
        digest = content_digest(data)
        relative = self.relative_path(study_uid, series_uid, sop_uid, digest)
        pending = self.start(data)
        stored = pending.place(relative, digest)
        pending.wait_durable()
        return stored

    def start(self, data: bytes) -> PendingFile:
        """Begin writing ``data``: a temporary file is written and fsynced in the background.

        The caller reads the header and hashes the bytes meanwhile, then calls
        :meth:`PendingFile.place` (or :meth:`PendingFile.discard`). Raises
        :class:`StorageFullError` at once when the disk is below its reserve.
        """
        self.check_free_space(len(data))
        return PendingFile(self, data)

    def _write_temporary(self, data: bytes) -> str:
        # O_DSYNC: each write returns once its bytes (and the size) are on stable storage, as
        # write + fdatasync would, in one system call (one GIL hand-back instead of two).
        tmp_name = os.path.join(self._incoming, f"{uuid.uuid4().hex}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC | os.O_CLOEXEC
        try:
            fd = os.open(tmp_name, flags, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(Path(tmp_name))
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(exc.errno, "disk full while storing an instance") from exc
            raise
        return tmp_name

    def _place(self, tmp_name: str, relative: str, size: int) -> str | None:
        """Rename a durable temporary file into place and return its folder (to fsync);
        None when that content is there already."""
        final = os.path.join(self.root, relative)  # validated UIDs: cannot leave the root
        try:
            if os.stat(final).st_size == size:
                _unlink_quietly(Path(tmp_name))
                return None  # the same content (same digest) is already durable
        except FileNotFoundError:
            pass
        folder = os.path.dirname(final)
        try:
            if folder not in self._folders:
                self._make_folders(folder)
            try:
                os.replace(tmp_name, final)
            except FileNotFoundError:  # the folder was removed behind our back: make it anew
                self._folders.discard(folder)
                self._make_folders(folder)
                os.replace(tmp_name, final)
        except OSError:
            _unlink_quietly(Path(tmp_name))
            raise
        return folder

    def _make_folders(self, folder: str) -> None:
        """Create a series folder (and its study folder), each entry durable in its parent."""
        series = Path(folder)
        new_folders = [p for p in (series.parent, series) if not p.exists()]
        series.mkdir(parents=True, exist_ok=True)
        for created in new_folders:
            _fsync_dir(created.parent)
        if len(self._folders) > 10_000:  # a long-running node: start afresh
            self._folders.clear()
        self._folders.add(folder)

    def write_file(self, relative_path: str, data: bytes) -> None:
        """Write a derived artefact (e.g. a preview PNG) atomically at ``relative_path``.

        Each component must be a UID or a plain name: nothing may leave the root.
        """
        parts = relative_path.split("/")
        if any(not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", part) for part in parts):
            raise InvalidUidError(f"unsafe artefact path {relative_path!r}")
        final = self.absolute(relative_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._incoming, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except OSError:
            _unlink_quietly(Path(tmp_name))
            raise
        _fsync_dir(final.parent)

    def remove(self, relative_path: str) -> None:
        """Remove a stored file (after the index stopped pointing at it)."""
        _unlink_quietly(self.absolute(relative_path))

    def sweep_incoming(self) -> int:
        """Remove temporary files left by a crash; returns how many."""
        count = 0
        for leftover in self._incoming.glob("*.part"):
            _unlink_quietly(leftover)
            count += 1
        if count:
            log.warning("removed %d partial file(s) left by an interrupted write", count)
        return count


def content_digest(data: bytes) -> str:
    """The SHA-256 of ``data`` (hex): kept in the index, its start names the file."""
    return hashlib.sha256(data).hexdigest()


_IO = ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage-io")
"""Writes and fsyncs run here while the receiving thread reads headers, hashes and indexes:
the system calls release the GIL, so the two overlap on separate cores."""


class PendingFile:
    """One instance on its way to durable storage (see :meth:`FileStore.start`).

    Order of durability: the bytes are fsynced before the file gets its final name, so a
    name never points at incomplete content. The folder's fsync (the name's durability) runs
    beside the caller's index commit; the caller answers Success only after
    :meth:`wait_durable`. Should a crash fall between the two, the unacknowledged sender sends
    again, the index finds the same digest, and the file is written again under its name.
    """

    def __init__(self, store: FileStore, data: bytes) -> None:
        self._store = store
        self._size = len(data)
        self._temporary: Future[str] = _IO.submit(store._write_temporary, data)
        self._folder_synced: Future[None] | None = None
        self.stored: StoredFile | None = None

    def place(self, relative: str, digest: str) -> StoredFile:
        """Wait for the bytes to be durable and give them their final name (``relative``,
        from :meth:`FileStore.relative_path` with ``digest``, their :func:`content_digest`)."""
        tmp_name = self._temporary.result()  # raises StorageFullError / OSError
        folder = self._store._place(tmp_name, relative, self._size)
        if folder is not None:
            self._folder_synced = _IO.submit(_fsync_dir, Path(folder))
        self.stored = StoredFile(relative, self._size, digest, created=folder is not None)
        return self.stored

    def wait_durable(self) -> None:
        """Return once the file's name is durable too (raises what the fsync raised)."""
        if self._folder_synced is not None:
            self._folder_synced.result()

    def discard(self) -> None:
        """Drop bytes that will not be stored (a refused instance): nothing stays behind."""
        try:
            tmp_name = self._temporary.result()
        except OSError:
            return  # the write failed and removed its temporary file
        if self.stored is None:
            _unlink_quietly(Path(tmp_name))
        elif self.stored.created:
            self.wait_durable()
            self._store.remove(self.stored.relative_path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
