"""What every synthetic CT object shares: where the series lies in the patient, its
identity (synthetic patient, study and series UIDs), the Type 1 and Type 2 attributes of the
CT Image IOD's common modules, file meta and pixel encoding (explicit VR little endian,
JPEG 2000 lossless or RLE lossless)."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

HuFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
TransferSyntaxName = Literal["explicit", "j2k", "rle"]

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "rle": RLELossless,
}
RESCALE_INTERCEPT = -1024.0
_STUDY_DATE = datetime.date(2024, 1, 15)


@dataclass(frozen=True)
class SeriesLayout:
    """Where an axial series' voxels lie in the patient (LPS, mm)."""

    rows: int
    columns: int
    slices: int
    pixel_spacing_mm: float
    slice_spacing_mm: float
    center: tuple[float, float, float]
    feet_first: bool = False
    reverse_order: bool = False  # Instance Numbers run inferior → superior instead

    @property
    def row_direction(self) -> np.ndarray:
        return np.array([-1.0, 0.0, 0.0] if self.feet_first else [1.0, 0.0, 0.0])

    @property
    def column_direction(self) -> np.ndarray:
        return np.array([0.0, 1.0, 0.0])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def z_positions(self) -> np.ndarray:
        """Slice positions (z, mm) from inferior to superior."""
        half = (self.slices - 1) / 2.0 * self.slice_spacing_mm
        return self.center[2] - half + np.arange(self.slices) * self.slice_spacing_mm

    def in_plane_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-left pixel offset (3,) and LPS x, y of every pixel, each (rows, columns)."""
        ps = self.pixel_spacing_mm
        r = np.arange(self.rows, dtype=np.float64)[:, None]
        c = np.arange(self.columns, dtype=np.float64)[None, :]
        corner = (
            np.array([self.center[0], self.center[1], 0.0])
            - (self.columns - 1) / 2.0 * ps * self.row_direction
            - (self.rows - 1) / 2.0 * ps * self.column_direction
        )
        x = corner[0] + c * ps * self.row_direction[0] + r * ps * self.column_direction[0]
        y = corner[1] + c * ps * self.row_direction[1] + r * ps * self.column_direction[1]
        return (
            corner,
            np.broadcast_to(x, (self.rows, self.columns)),
            np.broadcast_to(y, (self.rows, self.columns)),
        )


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what a synthetic series belongs to (all synthetic)."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    accession_number: str = ""
    series_description: str = "Synthetic spine CT"

    @classmethod
    def derived(cls, patient_id: str, seed: int) -> SeriesIdentity:
        """Identity with UIDs derived deterministically from the patient ID and seed."""
        sources = [patient_id, str(seed)]
        return cls(
            patient_id=patient_id,
            patient_name=f"PHANTOM^{patient_id}",
            study_instance_uid=generate_uid(entropy_srcs=[*sources, "study"]),
            series_instance_uid=generate_uid(entropy_srcs=[*sources, "series"]),
            frame_of_reference_uid=generate_uid(entropy_srcs=[*sources, "frame-of-reference"]),
            accession_number="A" + hashlib.sha256(f"{patient_id}/{seed}".encode()).hexdigest()[:12],
        )


def ds_values(*values: float) -> list[float]:
    """Decimal String values that fit the VR (16 characters): rounded to 0.1 µm."""
    return [round(float(value), 4) for value in values]


def stored_pixels(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu - RESCALE_INTERCEPT), -1024, 32767).astype(np.int16)


def base_dataset(identity: SeriesIdentity, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom, no patient data"
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _STUDY_DATE.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = identity.accession_number
    ds.StudyDescription = "Synthetic spine CT"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = identity.series_description
    ds.BodyPartExamined = "SPINE"
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "spine-triage synthetic phantom"
    ds.ManufacturerModelName = "phantom"
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = 400
    ds.WindowWidth = 1800
    return ds


def ct_image(
    identity: SeriesIdentity,
    stored: np.ndarray,
    *,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    sop_instance_uid: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    patient_position: str = "HFS",
) -> Dataset:
    """One CT Image Storage instance in memory: ``stored`` (rows, columns) int16 values with
    the rescale of :data:`RESCALE_INTERCEPT`, explicit VR little endian; any orientation.

    ``pixel_spacing`` is DICOM's (row spacing, column spacing).
    """
    sop_instance = sop_instance_uid or str(
        generate_uid(entropy_srcs=[identity.series_instance_uid, str(instance_number)])
    )
    ds = base_dataset(identity, CTImageStorage)
    ds.file_meta = file_meta_for(CTImageStorage, sop_instance)
    ds.SOPInstanceUID = sop_instance
    ds.ImageType = list(image_type)
    ds.PatientPosition = patient_position
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ds_values(*position)
    ds.ImageOrientationPatient = ds_values(*orientation)
    ds.SliceThickness = ds_values(slice_thickness)[0]
    ds.PixelSpacing = ds_values(*pixel_spacing)
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16).tobytes()
    return ds


def file_meta_for(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def encode_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> None:
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return
    ds.compress(transfer_syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
