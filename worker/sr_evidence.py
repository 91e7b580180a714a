"""The CT instances a result SR reports on, made fit to be its evidence: one study and one
frame of reference, the Type 2 patient/study attributes present, and a character set the SR
writer accepts. The source images themselves are never changed; a copy is made when needed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import pydicom
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)


def frame_of_reference(source_images: Sequence[pydicom.Dataset]) -> str:
    """The Frame of Reference UID the source images share (they must be of one study)."""
    studies = {str(image.StudyInstanceUID) for image in source_images}
    if len(studies) != 1:
        raise ValueError(f"the source images belong to {len(studies)} studies; one is required")
    frames = {str(image.get("FrameOfReferenceUID", "")) for image in source_images}
    if len(frames) != 1 or "" in frames:
        raise ValueError("the source images must share one Frame of Reference UID")
    return frames.pop()


_TYPE2_EVIDENCE_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def with_type2_attributes(image: pydicom.Dataset) -> pydicom.Dataset:
    """``image``, or a shallow copy with absent Type 2 patient/study attributes present, empty."""
    missing = [keyword for keyword in _TYPE2_EVIDENCE_KEYWORDS if keyword not in image]
    if not missing:
        return image
    logger.warning("source image lacks Type 2 attributes %s; the SR gets them empty", missing)
    patched = pydicom.Dataset()
    patched.update(image)
    for keyword in missing:
        setattr(patched, keyword, None)
    return patched


def in_utf8(image: pydicom.Dataset) -> pydicom.Dataset:
    """``image``, or a copy re-labelled UTF-8 when its character set uses ISO 2022 code
    extensions (e.g. ``\\ISO 2022 IR 87``, Japanese), which the SR writer does not accept.

    pydicom has already decoded the text values; only the label of their encoding changes, so
    the SR carries the same names, written as UTF-8 (ISO_IR 192).
    """
    charset = image.get("SpecificCharacterSet")
    values = list(charset) if isinstance(charset, list | tuple | MultiValue) else [charset]
    if not any(str(value or "").startswith("ISO 2022") for value in values):
        return image
    converted = copy.deepcopy(image)
    converted.decode()
    converted.SpecificCharacterSet = "ISO_IR 192"
    return converted
