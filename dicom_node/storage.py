"""The file store: received instances, byte for byte, durable before they are acknowledged.

Layout: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<digest>.dcm``. The
content digest in the name means a re-sent instance with other content never overwrites the
file the index points to: the new file is written beside it, the index switches to it in one
transaction, and only then is the old file removed.

Every write is a temporary file in ``ROOT/.incoming``, fsynced, renamed into place, and the
folder fsynced; a crash leaves at most a temporary file, which :meth:`FileStore.sweep_incoming`
removes at start-up. UIDs are validated before they become path components.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
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
        digest = hashlib.sha256(data).hexdigest()
        relative = self.relative_path(study_uid, series_uid, sop_uid, digest)
        final = self.absolute(relative)
        self.check_free_space(len(data))
        if final.exists() and final.stat().st_size == len(data):
            return StoredFile(relative, len(data), digest, created=False)  # already durable
        new_folders = [p for p in (final.parent.parent, final.parent) if not p.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._incoming, suffix=".part")
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:
                view = memoryview(data)
                while view:
                    written = handle.write(view)
                    view = view[written:] if written else view
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except OSError as exc:
            _unlink_quietly(Path(tmp_name))
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(exc.errno, "disk full while storing an instance") from exc
            raise
        _fsync_dir(final.parent)
        for folder in new_folders:  # a new folder's entry must be durable in its parent too
            _fsync_dir(folder.parent)
        return StoredFile(relative, len(data), digest, created=True)

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
