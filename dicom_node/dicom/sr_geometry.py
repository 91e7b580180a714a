"""The geometry rules of an ROI read from an SR: planar regions to slices and one polygon.

:mod:`dicom_node.dicom.sr_roi` finds the regions of a TID 1500 report and maps them to patient
coordinates (LPS, mm); this module checks each region and reduces them all to the ROI of
``METHOD.md``: the lateral positions x of the sagittal slices and one polygon of (y, z) points.
A region is a sequence of (x, y, z) points plus ``where``, the place in the report that the
error messages name. It defines :class:`RoiSrError`, which both modules raise.

- A region needs at least three distinct points (``require_area``).
- Every polygon must lie in a sagittal plane: its points' x spread by at most
  ``SAGITTAL_TOLERANCE_MM``; the polygon's slice position is the mean x (``sagittal_x``). Each
  region adds its x to the slice positions (positions closer than ``SAME_SLICE_TOLERANCE_MM``
  count once, sorted: ``distinct_sorted``).
- A polygon must be one the ROI accepts: an area in the sagittal plane (``polygon_yz``, with
  the ROI's own rule, :func:`model.serving.roi.validate_polygon`).
- With several regions, the ROI's polygon is their common polygon when they all agree, else
  the bounding rectangle of all their (y, z) points (``combined_polygon``). The method only
  uses the smallest square around the polygon's bounding box, so the model input is the same
  either way.
- Coordinates are rounded to ``COORDINATE_DECIMALS`` decimals (SCOORD3D stores float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.serving.roi import RoiError, validate_polygon

SAGITTAL_TOLERANCE_MM = 1.0
SAME_SLICE_TOLERANCE_MM = 0.01
COORDINATE_DECIMALS = 4

Points3D = tuple[tuple[float, float, float], ...]


class RoiSrError(ValueError):
    """The SR does not hold an ROI this product can use; the message says why."""


def require_area(points: np.ndarray, where: str) -> None:
    if len(distinct(points)) < 3:
        raise RoiSrError(f"{where}: the region has fewer than three distinct points")


def distinct(points: Any) -> list[tuple[float, ...]]:
    array = np.asarray(points, dtype=float)
    array = array.reshape(len(array), -1)
    return list(dict.fromkeys(tuple(row) for row in np.round(array, COORDINATE_DECIMALS)))


def as_points(points: np.ndarray) -> Points3D:
    return tuple((float(x), float(y), float(z)) for x, y, z in points)


def _open_points(points: Points3D) -> Points3D:
    """The polygon's vertices, without the closing repetition of the first one."""
    if len(points) > 1 and np.allclose(points[0], points[-1]):
        return points[:-1]
    return points


def sagittal_x(points_xyz: Points3D, where: str) -> float:
    xs = np.array([point[0] for point in _open_points(points_xyz)])
    spread = float(xs.max() - xs.min())
    if spread > SAGITTAL_TOLERANCE_MM:
        raise RoiSrError(
            f"{where}: the ROI is not in a sagittal plane "
            f"(its x spans {spread:.2f} mm, at most {SAGITTAL_TOLERANCE_MM} mm allowed)"
        )
    return round(float(xs.mean()), COORDINATE_DECIMALS)


def polygon_yz(points_xyz: Points3D, where: str) -> tuple[tuple[float, float], ...]:
    points = [
        (round(y, COORDINATE_DECIMALS), round(z, COORDINATE_DECIMALS))
        for _, y, z in _open_points(points_xyz)
    ]
    try:
        return validate_polygon(points)
    except RoiError as error:
        raise RoiSrError(f"{where}: the ROI has no area in the sagittal plane ({error})") from error


def distinct_sorted(values: Sequence[float]) -> tuple[float, ...]:
    kept: list[float] = []
    for value in sorted(values):
        if not kept or value - kept[-1] > SAME_SLICE_TOLERANCE_MM:
            kept.append(value)
    return tuple(kept)


def combined_polygon(
    polygons: Sequence[tuple[tuple[float, float], ...]],
) -> tuple[tuple[float, float], ...]:
    first = polygons[0]
    if all(
        len(polygon) == len(first) and np.allclose(polygon, first, atol=SAME_SLICE_TOLERANCE_MM)
        for polygon in polygons[1:]
    ):
        return first
    points = np.array([point for polygon in polygons for point in polygon])
    (y_min, z_min), (y_max, z_max) = points.min(axis=0), points.max(axis=0)
    return ((y_min, z_min), (y_max, z_min), (y_max, z_max), (y_min, z_max))
