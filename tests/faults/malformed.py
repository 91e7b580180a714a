"""Malformed DICOM objects for the bad-input tests: each builder turns a good CT slice into
the data set bytes a sender would put in a C-STORE (or a STOW-RS part), broken one way."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from tests.dicom_factory import ct_slice

PATIENT_NAME = "Leakcheck^Wilhelmina"
PATIENT_ID = "PID-LEAKCHECK-4711"


def patient_slice() -> Dataset:
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


# Each builder turns a good slice into the dataset bytes to send; the command then carries the
# slice's SOP Instance UID and transfer syntax as the builder left them.

Build = Callable[[Dataset], bytes]


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset as C-STORE carries it: the Part 10 encoding without preamble and meta."""
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    (meta_length,) = struct.unpack("<L", data[140:144])
    return data[144 + meta_length :]


def _at(body: bytes, group: int, element: int) -> int:
    """Offset of an element in a little endian dataset (its first occurrence)."""
    offset = body.find(struct.pack("<HH", group, element))
    assert offset >= 0, f"({group:04X},{element:04X}) not found"
    return offset


def _short_length(group: int, element: int, length: int) -> Build:
    """Declare another 2-byte length for an explicit VR element of a short VR."""

    def build(ds: Dataset) -> bytes:
        body = encoded(ds)
        at = _at(body, group, element)
        return body[: at + 6] + struct.pack("<H", length) + body[at + 8 :]

    return build


def cut(keep: Callable[[bytes], int], syntax: str = ExplicitVRLittleEndian) -> Build:
    return lambda ds: (body := encoded(ds, syntax))[: keep(body)]


def _compressed(*, cut: int = 0, fragments: list[bytes] | None = None) -> Build:
    """JPEG 2000: the last ``cut`` bytes cut off, or the fragments replaced."""

    def build(ds: Dataset) -> bytes:
        ds.compress(JPEG2000Lossless)
        if fragments is not None:
            ds.PixelData = encapsulate(fragments)
        body = encoded(ds)
        return body[: len(body) - cut]

    return build


def _changed(**values: Any) -> Build:
    def build(ds: Dataset) -> bytes:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return encoded(ds)

    return build


def _pixels_declared_4gib(ds: Dataset) -> bytes:
    body = encoded(ds)
    at = _at(body, 0x7FE0, 0x0010)
    return body[: at + 8] + struct.pack("<L", 0xFFFFFFF0) + body[at + 12 :]


def _header_element_declared_4gib(ds: Dataset) -> bytes:
    body = encoded(ds)
    at = _at(body, 0x0008, 0x0020)  # Study Date, right after the SOP Instance UID
    return body[:at] + struct.pack("<HH2sHL", 0x0008, 0x001A, b"OB", 0, 0xFFFFFFF0) + body[at:]


def _command_names_another_instance(ds: Dataset) -> bytes:
    body = encoded(ds)
    ds.SOPInstanceUID = generate_uid()
    return body


def without_pixels(ds: Dataset) -> bytes:
    del ds.PixelData
    return encoded(ds)


ESCAPE = "1.2/../../../escaped"
MALFORMED = [
    pytest.param(cut(lambda b: _at(b, 0x0020, 0x000D) + 9), 0xC210, id="truncated in header"),
    pytest.param(cut(lambda b: len(b) - 1000), 0xC210, id="truncated in pixel data"),
    pytest.param(
        cut(lambda b: len(b) - 700, ImplicitVRLittleEndian), 0xC210, id="truncated implicit VR"
    ),
    # what is left of a cut element header cannot be told from no Pixel Data at all
    pytest.param(cut(lambda b: _at(b, 0x7FE0, 0x0010) + 6), 0xA900, id="cut pixel element"),
    pytest.param(_compressed(cut=40), 0xC210, id="truncated JPEG 2000"),
    pytest.param(_compressed(fragments=[]), 0xC210, id="JPEG 2000 without a fragment"),
    pytest.param(_short_length(0x0010, 0x0010, 0x100), 0xC210, id="Patient Name longer"),
    # the misaligned rest parses as a dataset without Pixel Data
    pytest.param(_short_length(0x0028, 0x0010, 4), 0xA900, id="Rows as four bytes"),
    pytest.param(
        _changed(PixelData=bytes(1024)), 0xC210, id="pixel data shorter than Rows x Columns"
    ),
    pytest.param(without_pixels, 0xA900, id="missing pixel data"),
    pytest.param(_pixels_declared_4gib, 0xC210, id="pixel data declared 4 GiB"),
    pytest.param(_header_element_declared_4gib, 0xC210, id="header element declared 4 GiB"),
    pytest.param(_changed(StudyInstanceUID="../../escaped"), 0xC210, id="study UID with .."),
    pytest.param(_changed(SeriesInstanceUID=ESCAPE), 0xC210, id="series UID with .."),
    pytest.param(_changed(SOPInstanceUID=ESCAPE), 0xC210, id="SOP Instance UID with .."),
    pytest.param(_command_names_another_instance, 0xC210, id="command names another instance"),
    pytest.param(
        lambda ds: bytes(np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8)),
        0xC210,
        id="not DICOM",
    ),
]


def part10(sop_instance_uid: str, body: bytes, syntax: str) -> bytes:
    """A Part 10 file around dataset bytes as they are (file meta written by pydicom)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue() + body
