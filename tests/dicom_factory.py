"""Small synthetic DICOM objects for node tests (made by code, never patient data), built
with the project's own synthetic CT writer (:mod:`model.synthetic.dicom`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from model.synthetic.dicom import SeriesIdentity, ct_image


def ct_slice(
    *,
    study_uid: str,
    series_uid: str,
    index: int,
    rows: int = 32,
    columns: int = 32,
    sop_uid: str | None = None,
    patient_id: str = "SYNTH-0001",
    seed: int = 0,
) -> Dataset:
    """One axial CT Image Storage instance with valid headers and int16 pixel data."""
    rng = np.random.default_rng(seed + index)
    identity = SeriesIdentity(
        patient_id=patient_id,
        patient_name="Synthetic^Phantom",
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=str(generate_uid(entropy_srcs=[study_uid, "for"])),
        accession_number="ACC0001",
    )
    return ct_image(
        identity,
        rng.integers(0, 2000, size=(rows, columns), dtype=np.int16),
        instance_number=index + 1,
        position=(-16.0, -16.0, float(index) * 3.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(1.0, 1.0),
        slice_thickness=3.0,
        sop_instance_uid=sop_uid or str(generate_uid()),
    )


def write_ct_series(
    folder: Path,
    count: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rows: int = 32,
    columns: int = 32,
) -> list[Path]:
    """Write ``count`` slices of one series into ``folder``; returns the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid, series_uid=series_uid, index=index, rows=rows, columns=columns
        )
        path = folder / f"ct{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
