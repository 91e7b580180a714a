"""Synthetic series for geometry tests: smooth blobs at known patient coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.serving.roi import Roi
from model.synthetic.dicom import ct_image, stored_pixels
from model.synthetic.series import SeriesIdentity, SeriesLayout, TransferSyntaxName, write_ct_series

Point = tuple[float, float, float]


def blob_hu(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    markers: Sequence[Point],
    *,
    sigma_mm: float = 1.5,
    peak_hu: float = 1000.0,
) -> np.ndarray:
    """Soft tissue with a gentle gradient plus Gaussian blobs at ``markers`` (broadcasting)."""
    hu = 40.0 + 0.5 * x - 0.3 * y + 0.2 * z
    for mx, my, mz in markers:
        d2 = (x - mx) ** 2 + (y - my) ** 2 + (z - mz) ** 2
        hu = hu + peak_hu * np.exp(-d2 / (2.0 * sigma_mm**2))
    return np.asarray(hu, dtype=np.float64)


def blob_field(
    markers: Sequence[Point], *, sigma_mm: float = 1.5, peak_hu: float = 1000.0
) -> object:
    """:func:`blob_hu` as an HU function of an axial grid (see ``write_ct_series``)."""

    def hu_at(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return blob_hu(
            x[None], y[None], z[:, None, None], markers, sigma_mm=sigma_mm, peak_hu=peak_hu
        )

    return hu_at


def write_blob_series(
    series_dir: Path,
    markers: Sequence[Point],
    *,
    rows: int = 96,
    columns: int = 96,
    slices: int = 48,
    pixel_spacing_mm: float = 0.7,
    slice_spacing_mm: float = 1.0,
    center: Point = (0.0, 0.0, 0.0),
    feet_first: bool = False,
    reverse_order: bool = False,
    transfer_syntax: TransferSyntaxName = "explicit",
    multiframe: bool = False,
    patient_id: str = "GEOM1",
    sigma_mm: float = 1.5,
) -> tuple[list[Path], SeriesIdentity]:
    layout = SeriesLayout(
        rows=rows,
        columns=columns,
        slices=slices,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        center=center,
        feet_first=feet_first,
        reverse_order=reverse_order,
    )
    identity = SeriesIdentity.derived(patient_id, 0)
    paths = write_ct_series(
        series_dir,
        blob_field(markers, sigma_mm=sigma_mm),  # type: ignore[arg-type]
        layout,
        identity,
        transfer_syntax=transfer_syntax,
        multiframe=multiframe,
    )
    return paths, identity


def square_roi(
    identity: SeriesIdentity,
    *,
    center_yz: tuple[float, float],
    side: float,
    slices_x_mm: Sequence[float],
) -> Roi:
    cy, cz = center_yz
    half = side / 2.0
    return Roi(
        study_instance_uid=identity.study_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        slices_x_mm=tuple(slices_x_mm),
        polygon_yz_mm=(
            (cy - half, cz - half),
            (cy + half, cz - half),
            (cy + half, cz + half),
            (cy - half, cz + half),
        ),
    )


def write_oriented_series(
    series_dir: Path,
    markers: Sequence[Point],
    *,
    row_direction: Sequence[float],
    column_direction: Sequence[float],
    center: Point = (0.0, 0.0, 0.0),
    size: int = 96,
    slices: int = 60,
    pixel_spacing_mm: float = 0.7,
    slice_spacing_mm: float = 0.8,
    patient_id: str = "OBLIQUE1",
) -> tuple[list[Path], SeriesIdentity]:
    """A series in any orientation (sagittal, coronal, oblique), written pixel by pixel."""
    row = np.asarray(row_direction, dtype=np.float64)
    column = np.asarray(column_direction, dtype=np.float64)
    row /= np.linalg.norm(row)
    column /= np.linalg.norm(column)
    normal = np.cross(row, column)
    identity = SeriesIdentity.derived(patient_id, 0)
    series_dir.mkdir(parents=True, exist_ok=True)
    r = np.arange(size, dtype=np.float64)[:, None, None]
    c = np.arange(size, dtype=np.float64)[None, :, None]
    paths = []
    for k in range(slices):
        offset = (k - (slices - 1) / 2) * slice_spacing_mm
        corner = (
            np.asarray(center)
            + offset * normal
            - (size - 1) / 2 * pixel_spacing_mm * (row + column)
        )
        points = corner + c * pixel_spacing_mm * row + r * pixel_spacing_mm * column
        hu = blob_hu(points[..., 0], points[..., 1], points[..., 2], markers)
        ds = ct_image(
            identity,
            stored_pixels(hu),
            instance_number=k + 1,
            position=corner,
            orientation=(*row, *column),
            pixel_spacing=(pixel_spacing_mm, pixel_spacing_mm),
            slice_thickness=slice_spacing_mm,
        )
        path = series_dir / f"OB{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, identity
