"""Small synthetic CT images for SR tests, made with the project's synthetic CT writer."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from model.synthetic import dicom as synthetic_dicom

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
    """One CT Image Storage instance with a small int16 pixel matrix (a bright square)."""
    identity = synthetic_dicom.SeriesIdentity(
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        accession_number="ACC0001",
        series_description="Spine bone 3 mm",
    )
    pixels = np.full((rows, columns), 1024, dtype=np.int16)
    pixels[rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = 1024 + 700
    ds = synthetic_dicom.ct_image(
        identity,
        pixels,
        instance_number=instance_number,
        position=position,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        sop_instance_uid=str(generate_uid()),
    )
    # what the SR tests read back: the scanner (acquisition equipment) and the patient module
    ds.Manufacturer = "Synthetic Scanner Co"
    ds.ManufacturerModelName = "Phantom 1"
    ds.StudyDescription = "CT spine"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240301"
    ds.ContentTime = "101530"
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
