"""Small synthetic CT images with valid CT Image Storage headers, made by code for SR tests."""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Synthetic^Spine"
PATIENT_ID = "SYN-0001"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Sagittal display: columns run anterior → posterior (+y), rows superior → inferior (−z).
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def new_study() -> tuple[str, str]:
    """(Study Instance UID, Frame of Reference UID) for a fresh synthetic study."""
    return str(generate_uid()), str(generate_uid())


def ct_image(
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    instance_number: int,
    position: tuple[float, float, float],
    orientation: tuple[float, ...] = AXIAL,
    rows: int = 16,
    columns: int = 16,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_thickness: float = 3.0,
) -> pydicom.Dataset:
    """One CT Image Storage instance with a small int16 pixel matrix."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    today = datetime.date(2024, 3, 1).strftime("%Y%m%d")
    ds.StudyDate = today
    ds.SeriesDate = today
    ds.ContentDate = today
    ds.AcquisitionDate = today
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101530"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic Scanner Co"
    ds.ManufacturerModelName = "Phantom 1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT spine"
    ds.SeriesDescription = "Spine bone 3 mm"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.BodyPartExamined = "SPINE"
    ds.SliceThickness = slice_thickness
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 400
    ds.WindowWidth = 1800
    ds.AcquisitionNumber = 1
    pixels = np.full((rows, columns), 1024, dtype=np.int16)
    pixels[rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = 1024 + 700
    ds.PixelData = pixels.tobytes()
    return ds


def axial_series(
    study_uid: str, frame_of_reference_uid: str, *, slices: int = 6, spacing_mm: float = 3.0
) -> list[pydicom.Dataset]:
    """An axial CT series of ``slices`` instances stacked along +z."""
    series_uid = str(generate_uid())
    return [
        ct_image(
            study_uid=study_uid,
            series_uid=series_uid,
            frame_of_reference_uid=frame_of_reference_uid,
            instance_number=index + 1,
            position=(-6.4, -6.4, -100.0 + index * spacing_mm),
        )
        for index in range(slices)
    ]


def sagittal_image(
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    *,
    x_mm: float,
    instance_number: int = 1,
    top_left: tuple[float, float] = (-20.0, 40.0),
    pixel_spacing: tuple[float, float] = (0.5, 0.8),
    rows: int = 64,
    columns: int = 48,
) -> pydicom.Dataset:
    """A sagittal CT image at lateral position ``x_mm``; ``top_left`` is the first pixel's (y, z).

    ``pixel_spacing`` is DICOM's (row spacing, column spacing): rows step along −z by the
    first value, columns along +y by the second.
    """
    image = ct_image(
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        instance_number=instance_number,
        position=(x_mm, *top_left),
        orientation=SAGITTAL,
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
    )
    image.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    return image
