"""A local folder that receives a copy of every result SR (and the review images it draws on
and its key image), each as ``<SOPInstanceUID>.dcm``.

The copy is atomic: written to a hidden temporary file in the same folder, fsynced, renamed
over the final name and the folder fsynced, so a reader never sees half a file and a crash
leaves at most a ``.*.tmp`` file behind. A re-send replaces the file with identical content.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.errors

from dicom_node.dicom.storage import InvalidUidError, validate_uid
from dicom_node.settings import FolderDestination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
FILE_MODE = 0o640
# Errors an operator has to fix (then `spine-triage deliveries retry`); others may heal.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


class FolderCopier:
    """Copies the SR file into one folder."""

    kind = "folder"

    def __init__(self, config: FolderDestination) -> None:
        self.name = config.name
        self.folder = Path(config.path)

    def target_path(self, sop_instance_uid: str) -> Path:
        try:
            uid = validate_uid(sop_instance_uid, "SOPInstanceUID")
        except InvalidUidError as exc:
            raise PermanentError(f"{self.name}: {exc}") from exc
        return self.folder / f"{uid}.dcm"

    def send(self, payload: DeliveryPayload) -> None:
        *images, sr_path = payload.report_files()
        for path in images:  # the review images and the key image the SR names, first
            self._copy(path, self.target_path(_sop_instance_uid(path, self.name)))
        self._copy(sr_path, self.target_path(payload.sr_sop_instance_uid))
        logger.info(
            "%s: SR %s (and %d image(s)) copied to %s delivery=%d",
            self.name,
            payload.sr_sop_instance_uid,
            len(images),
            self.folder,
            payload.delivery_id,
        )

    def _copy(self, path: Path, target: Path) -> None:
        try:
            source = path.open("rb")
        except OSError as exc:
            raise PermanentError(f"{self.name}: cannot read {path}: {exc}") from exc
        with source:
            try:
                copy_atomically(source, target)
            except OSError as exc:
                error = PermanentError if exc.errno in _PERMANENT_ERRNOS else TransientError
                raise error(f"{self.name}: cannot write {target}: {exc}") from exc


def _sop_instance_uid(path: Path, name: str) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(header.SOPInstanceUID)
    except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise PermanentError(f"{name}: cannot read the review image {path}: {exc}") from exc


def copy_atomically(source: BinaryIO, target: Path) -> None:
    """Write the binary stream ``source`` to ``target`` (tmp + fsync + rename + folder fsync).

    The file is made readable by its owner and group only (mode 0640): it names a patient.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as output:
            while chunk := source.read(CHUNK_BYTES):
                output.write(chunk)
            output.flush()
            os.fsync(output.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
