"""Synthetic series for geometry tests: smooth blobs at known patient coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.roi import RoiAnnotation
from model.synth_dicom import SeriesIdentity, SeriesLayout, TransferSyntaxName, write_ct_series

Point = tuple[float, float, float]


def blob_field(
    markers: Sequence[Point], *, sigma_mm: float = 1.5, peak_hu: float = 1000.0
) -> object:
    """HU function: soft tissue with a gentle gradient plus Gaussian blobs at ``markers``."""

    def hu_at(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        x3, y3, z3 = x[None], y[None], z[:, None, None]
        hu = 40.0 + 0.5 * x3 - 0.3 * y3 + 0.2 * z3
        for mx, my, mz in markers:
            d2 = (x3 - mx) ** 2 + (y3 - my) ** 2 + (z3 - mz) ** 2
            hu = hu + peak_hu * np.exp(-d2 / (2.0 * sigma_mm**2))
        return np.asarray(hu, dtype=np.float64)

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
) -> RoiAnnotation:
    cy, cz = center_yz
    half = side / 2.0
    return RoiAnnotation(
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
